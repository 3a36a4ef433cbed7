#!/usr/bin/env python3
"""Joins the dropout benchmark results of both sides and reports them (Python 3 standard library only).

Usage:
  python3 scripts/bench_report.py RESULTS.jsonl [MORE.jsonl ...]
      [--write-json benches/results/NAME.json] [--update BENCHMARKS.md] [--check]

Inputs are the JSON lines that `cargo bench --bench dropout` (side "dropfuse") and
`benches/peers/dropout_torch.py` (side "peer") append to $DROPFUSE_BENCH_JSON, mixed in any order.
Rows without "impl" (older formats) are ignored; when the same (side, impl, kernel, dtype, n,
method) appears more than once, the last one read wins.

Each dropfuse row (impl "dropfuse") is joined with every peer row of the same (kernel, dtype, n,
method); speedup = peer_ms / ms.

  (always)      prints markdown tables: the burst table at the largest burst n, and the sweep tables
  --write-json  writes the joined rows as a JSON array
  --update F    replaces the text between the GENERATED markers in F with the tables (appends a
                "## Latest generated results" section with the markers when F has none)
  --check       prints one PASS/FAIL line per acceptance target; exit status 1 if any fails
                (missing data fails as "no data")
"""
import argparse
import json
import os
import shlex
import sys

BEGIN = "<!-- BEGIN GENERATED: bench_report.py -->"
END = "<!-- END GENERATED: bench_report.py -->"

KERNELS = ["copy", "mask", "forward_mask", "forward_maskless", "backward_mask", "backward_maskless"]
KERNEL_LABEL = {
    "mask": "mask only",
    "forward_mask": "forward, bit mask",
    "forward_maskless": "forward, no mask",
    "backward_mask": "backward from mask",
    "backward_maskless": "backward, no mask",
    "copy": "copy",
}
DTYPES = ["f16", "bf16", "f32"]
PEER_ORDER = ["torch.native_dropout", "triton.seeded_dropout", "torch.compile.dropout"]
SWEEP_PEER = "torch.native_dropout"
SWEEP_KERNELS = ["forward_mask", "backward_mask"]

# Acceptance targets (--check).
CHECK_LOG2_N = 28
MIN_COPY_FRACTION = 0.92
SWEEP_COPY_FRACTION_LOG2_MIN = 26
# (kernel, dtypes or None for every dtype present, peer, minimum speed-up)
BURST_TARGETS = [
    ("forward_mask", ["f16", "bf16"], "torch.native_dropout", 1.5),
    ("forward_mask", ["f32"], "torch.native_dropout", 1.4),
    ("backward_mask", None, "torch.native_dropout", 1.15),
    ("forward_maskless", None, "triton.seeded_dropout", 3.0),
]


def order(seq, value):
    return seq.index(value) if value in seq else len(seq)


def side_of(row):
    side = row.get("side")
    if side:
        return side
    # No "side": peer rows carry "torch"; dropfuse and copy rows without it are the Rust side's.
    return "peer" if "torch" in row or row.get("impl") not in ("dropfuse", "copy") else "dropfuse"


def load(paths):
    """{(side, impl, kernel, dtype, n, method): row}, the last occurrence winning."""
    rows = {}
    for path in paths:
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"{path}:{lineno}: not JSON ({e}); skipped", file=sys.stderr)
                    continue
                if not isinstance(row, dict) or "impl" not in row or row.get("ms") is None:
                    continue
                row["side"] = side_of(row)
                key = (row["side"], row["impl"], row.get("kernel"), row.get("dtype"), row.get("n"),
                       row.get("method", "burst"))
                rows[key] = row
    return rows


def sort_key(r):
    return (r["method"] != "burst", order(KERNELS, r["kernel"]), order(DTYPES, r["dtype"]), r["n"],
            order(PEER_ORDER, r["peer"]), r["peer"] or "")


def join(rows):
    peers = {}
    for (side, impl, kernel, dtype, n, method), row in rows.items():
        if side == "peer" and impl != "copy":
            peers.setdefault((kernel, dtype, n, method), []).append(row)
    out = []
    for (side, impl, kernel, dtype, n, method), row in rows.items():
        if side != "dropfuse" or impl != "dropfuse":
            continue
        base = dict(kernel=kernel, dtype=dtype, n=n, method=method, ms=row["ms"], bytes=row.get("bytes"),
                    gbps=row.get("gbps"), copy_ms=row.get("copy_ms"), copy_fraction=row.get("copy_fraction"),
                    peer=None, peer_ms=None, peer_copy_fraction=None, speedup=None, gpu=row.get("gpu"),
                    date=row.get("date"), commit=row.get("commit"))
        matches = peers.get((kernel, dtype, n, method), [])
        if not matches:
            out.append(base)
        for p in matches:
            r = dict(base)
            r.update(peer=p["impl"], peer_ms=p["ms"], peer_copy_fraction=p.get("copy_fraction"),
                     speedup=p["ms"] / row["ms"] if row["ms"] else None)
            out.append(r)
    out.sort(key=sort_key)
    return out


def fmt_ms(v):
    if v is None:
        return ""
    return f"{v:.3f}" if v >= 10 else f"{v:.4g}" if v >= 1e-3 else f"{v:.3g}"


def fmt(v, spec, suffix=""):
    return "" if v is None else format(v, spec) + suffix


def log2_label(n):
    if n and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return str(n)


def table(header, align, body):
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return lines


def is_drop_block(kernel):
    return str(kernel).startswith("drop_block")


def dropout_rows(rows):
    """The dropout family's rows (and the copies at dropout sizes): not DropBlock's."""
    block_ns = {k[4] for k in rows if is_drop_block(k[2])}
    return {k: r for k, r in rows.items() if not is_drop_block(k[2]) and not (k[2] == "copy" and k[4] in block_ns)}


def burst_n(rows):
    ns = [k[4] for k in rows if k[5] == "burst" and k[0] == "dropfuse"] or [k[4] for k in rows if k[5] == "burst"]
    return max(ns) if ns else None


def burst_tables(rows):
    rows = dropout_rows(rows)
    n = burst_n(rows)
    if n is None:
        return ["No burst results."]
    get = rows.get
    peers = sorted({k[1] for k in rows if k[0] == "peer" and k[1] != "copy" and k[4] == n and k[5] == "burst"},
                   key=lambda p: (order(PEER_ORDER, p), p))
    kernels = sorted({k[2] for k in rows if k[4] == n and k[5] == "burst" and k[2] != "copy"},
                     key=lambda k: order(KERNELS, k))
    dtypes = sorted({k[3] for k in rows if k[4] == n and k[5] == "burst"}, key=lambda d: order(DTYPES, d))
    lines = [f"Burst: n = {log2_label(n)} ({n}) elements, p = 0.1; ms per call (median of event-timed windows); "
             "\"of copy\" = bandwidth over a device copy of the same dtype in the same run; speed-up = peer ms / "
             "dropfuse ms.", ""]
    header = ["kernel", "dtype", "dropfuse ms", "GB/s", "of copy"]
    align = ["---", "---", "---:", "---:", "---:"]
    for p in peers:
        header += [f"`{p}` ms", "speed-up"]
        align += ["---:", "---:"]
    body = []
    for kernel in kernels:
        for dtype in dtypes:
            d = get(("dropfuse", "dropfuse", kernel, dtype, n, "burst"))
            prow = {p: get(("peer", p, kernel, dtype, n, "burst")) for p in peers}
            if d is None and not any(prow.values()):
                continue
            r = [KERNEL_LABEL.get(kernel, kernel), dtype]
            r += [fmt_ms(d["ms"]), fmt(d.get("gbps"), ".1f"), fmt(d.get("copy_fraction"), ".3f")] if d else ["", "", ""]
            for p in peers:
                q = prow[p]
                if q is None:
                    r += ["", ""]
                else:
                    r += [fmt_ms(q["ms"]), fmt(q["ms"] / d["ms"], ".2f", "x") if d and d["ms"] else ""]
            body.append(r)
    lines += table(header, align, body)
    lines += ["", "Copy baseline (device to device, read + write of one input-sized buffer):", ""]
    body = []
    for dtype in dtypes:
        d = get(("dropfuse", "copy", "copy", dtype, n, "burst"))
        q = get(("peer", "copy", "copy", dtype, n, "burst"))
        if d is None and q is None:
            continue
        body.append([dtype, fmt_ms(d and d["ms"]), fmt(d and d.get("gbps"), ".1f"), fmt_ms(q and q["ms"]),
                     fmt(q and q.get("gbps"), ".1f")])
    lines += table(["dtype", "dropfuse side ms", "GB/s", "peer side ms", "GB/s"], ["---", "---:", "---:", "---:", "---:"],
                   body)
    return lines


def sweep_tables(rows):
    keys = [k for k in rows if k[5] == "sweep"]
    if not keys:
        return ["No sweep results."]
    ns = sorted({k[4] for k in keys})
    dtypes = sorted({k[3] for k in keys}, key=lambda d: order(DTYPES, d))
    get = rows.get
    lines = [f"Size sweep: ms per call (median of 7 windows of >= ~2 ms each); torch = `{SWEEP_PEER}`; "
             "speed-up = torch ms / dropfuse ms; \"of copy\" = dropfuse bandwidth over the copy's."]
    for kernel in SWEEP_KERNELS:
        header, align = ["n"], ["---:"]
        for dt in dtypes:
            header += [f"{dt} dropfuse ms", f"{dt} torch ms", f"{dt} speed-up", f"{dt} of copy"]
            align += ["---:"] * 4
        body = []
        for n in ns:
            r = [log2_label(n)]
            seen = False
            for dt in dtypes:
                d = get(("dropfuse", "dropfuse", kernel, dt, n, "sweep"))
                q = get(("peer", SWEEP_PEER, kernel, dt, n, "sweep"))
                seen = seen or d is not None or q is not None
                r += [fmt_ms(d and d["ms"]), fmt_ms(q and q["ms"]),
                      fmt(q["ms"] / d["ms"], ".2f", "x") if d and q and d["ms"] else "",
                      fmt(d and d.get("copy_fraction"), ".3f")]
            if seen:
                body.append(r)
        lines += ["", f"{KERNEL_LABEL[kernel]} (`{kernel}`):", ""] + table(header, align, body)
    header, align = ["n"], ["---:"]
    for dt in dtypes:
        header += [f"{dt} copy ms (dropfuse side)", f"{dt} copy ms (peer side)"]
        align += ["---:", "---:"]
    body = []
    for n in ns:
        r = [log2_label(n)]
        seen = False
        for dt in dtypes:
            d = get(("dropfuse", "copy", "copy", dt, n, "sweep"))
            q = get(("peer", "copy", "copy", dt, n, "sweep"))
            seen = seen or d is not None or q is not None
            r += [fmt_ms(d and d["ms"]), fmt_ms(q and q["ms"])]
        if seen:
            body.append(r)
    lines += ["", "Device copy:", ""] + table(header, align, body)
    return lines


# DropBlock: peers in table order; a "(reimpl)" suffix marks the peer script's re-implementation,
# used when the library is not installed.
BLOCK_PEERS = ["timm.drop_block_2d", "timm.drop_block_fast_2d", "torchvision.drop_block2d",
               "torchvision.drop_block3d", "torch.compile.drop_block_2d", "torch.mask_mul"]
# (kernel, peer, minimum speed-up): issue 4's acceptance.
BLOCK_TARGETS = [
    ("drop_block_2d_forward", "timm.drop_block_2d", 4.0),
    ("drop_block_2d_forward", "torchvision.drop_block2d", 25.0),
]


def block_peer(rows, kernel, dtype, n, peer):
    """The peer row for `peer`, or its re-implementation's ("(reimpl)" suffix)."""
    return rows.get(("peer", peer, kernel, dtype, n, "burst")) or rows.get(
        ("peer", peer + "(reimpl)", kernel, dtype, n, "burst"))


def drop_block_tables(rows):
    keys = sorted((k for k in rows if k[0] == "dropfuse" and k[1] == "dropfuse" and is_drop_block(k[2])),
                  key=lambda k: (k[2], order(DTYPES, k[3]), k[4]))
    if not keys:
        return ["No DropBlock results."]
    peers = [p for p in BLOCK_PEERS if any(block_peer(rows, k[2], k[3], k[4], p) for k in keys)]
    lines = ["DropBlock (p = 0.1, global normalisation, one mask per channel): ms per call (median of "
             "event-timed windows); \"of copy\" = bandwidth (x, y and bit mask) over a device copy of x in the same "
             "run; speed-up = peer ms / dropfuse ms; \"(reimpl)\" = the peer script's re-implementation, timed "
             "because the library was not installed.", ""]
    header = ["kernel", "shape", "block", "dtype", "dropfuse ms", "GB/s", "of copy"]
    align = ["---", "---", "---:", "---", "---:", "---:", "---:"]
    for p in peers:
        header += [f"`{p}` ms", "speed-up"]
        align += ["---:", "---:"]
    body = []
    for key in keys:
        d = rows[key]
        r = [key[2], d.get("shape", str(key[4])), d.get("block_size", ""), key[3], fmt_ms(d["ms"]),
             fmt(d.get("gbps"), ".1f"), fmt(d.get("copy_fraction"), ".3f")]
        for p in peers:
            q = block_peer(rows, key[2], key[3], key[4], p)
            if q is None:
                r += ["", ""]
            else:
                tag = " (reimpl)" if q["impl"].endswith("(reimpl)") else ""
                r += [fmt_ms(q["ms"]) + tag, fmt(q["ms"] / d["ms"], ".2f", "x") if d["ms"] else ""]
        body.append(r)
    return lines + table(header, align, body)


def uniq(rows, field, side=None):
    vals = sorted({str(r.get(field)) for k, r in rows.items() if r.get(field) and (side is None or k[0] == side)})
    return ", ".join(vals) if vals else "unknown"


def report(rows, command):
    lines = [f"GPU {uniq(rows, 'gpu')}, {uniq(rows, 'date')} (UTC), commit {uniq(rows, 'commit', 'dropfuse')}; "
             f"torch {uniq(rows, 'torch', 'peer')}. Produced by `{command}`.", ""]
    lines += ["### Burst", ""] + burst_tables(rows)
    lines += ["", "### Size sweep", ""] + sweep_tables(rows)
    lines += ["", "### DropBlock", ""] + drop_block_tables(rows)
    return "\n".join(lines) + "\n"


def update(path, text):
    with open(path) as fh:
        doc = fh.read()
    block = f"{BEGIN}\n\n{text}\n{END}"
    b, e = doc.find(BEGIN), doc.find(END)
    if b != -1 and e != -1 and e > b:
        doc = doc[:b] + block + doc[e + len(END):]
    else:
        if b != -1 or e != -1:
            print(f"{path}: only one GENERATED marker found; appending a new section", file=sys.stderr)
        doc = doc.rstrip("\n") + f"\n\n## Latest generated results\n\n{block}\n"
    with open(path, "w") as fh:
        fh.write(doc)


def bound_note(rows, d, q, min_speedup):
    """Says whether a missed speed-up target is reachable at all: dropfuse must move its bytes in
    peer_ms / target, and no run can beat the best bandwidth seen in it (the copies', the peer's)."""
    best = max([r["gbps"] for r in rows.values() if r.get("method") == "burst" and r.get("n") == d["n"]
                and r.get("gbps") and r.get("kernel") != "mask"] + [q["gbps"]])
    need_ms = q["ms"] / min_speedup
    floor_ms = d["bytes"] / best / 1e6
    if floor_ms > need_ms:
        return (f"; unreachable: the target needs {need_ms:.4f} ms, moving dropfuse's {d['bytes']} bytes "
                f"at the run's best bandwidth ({best:.0f} GB/s) takes {floor_ms:.4f} ms")
    return f"; reachable: at the run's best bandwidth ({best:.0f} GB/s) the bytes take {floor_ms:.4f} ms"


def check(rows):
    """[(ok, line)] for every acceptance target."""
    res = []
    n = 1 << CHECK_LOG2_N
    nl = log2_label(n)

    def add(ok, what, detail):
        res.append((ok, f"{'PASS' if ok else 'FAIL'} {what}: {detail}"))

    for kernel, dtypes, peer, min_speedup in BURST_TARGETS:
        if dtypes is None:
            dtypes = sorted({k[3] for k in rows if k[0] == "dropfuse" and k[1] == "dropfuse" and k[2] == kernel
                             and k[4] == n and k[5] == "burst"}, key=lambda d: order(DTYPES, d))
            if not dtypes:
                add(False, f"burst {kernel} n={nl}", "no data")
                continue
        for dt in dtypes:
            what = f"burst {kernel} {dt} n={nl}"
            d = rows.get(("dropfuse", "dropfuse", kernel, dt, n, "burst"))
            q = rows.get(("peer", peer, kernel, dt, n, "burst"))
            frac = d and d.get("copy_fraction")
            if frac is None:
                add(False, f"{what} copy_fraction", "no data")
            else:
                add(frac >= MIN_COPY_FRACTION, f"{what} copy_fraction", f"{frac:.3f} (target >= {MIN_COPY_FRACTION})")
            if d is None or q is None or not d["ms"]:
                missing = [name for name, r in (("dropfuse", d), (peer, q)) if r is None] or ["ms 0"]
                add(False, f"{what} speed-up vs {peer}", f"no data ({', '.join(missing)})")
            else:
                s = q["ms"] / d["ms"]
                detail = f"{s:.3f}x (target >= {min_speedup}x; {q['ms']:.4f} / {d['ms']:.4f} ms)"
                if s < min_speedup:
                    detail += bound_note(rows, d, q, min_speedup)
                add(s >= min_speedup, f"{what} speed-up vs {peer}", detail)

    sweep = [k for k in rows if k[0] == "dropfuse" and k[1] == "dropfuse" and k[2] in SWEEP_KERNELS and k[5] == "sweep"]
    if not sweep:
        add(False, "sweep", "no data")
    compared = 0
    for key in sorted(sweep, key=lambda k: (order(SWEEP_KERNELS, k[2]), order(DTYPES, k[3]), k[4])):
        _, _, kernel, dt, sn, _ = key
        d = rows[key]
        what = f"sweep {kernel} {dt} n={log2_label(sn)}"
        q = rows.get(("peer", SWEEP_PEER, kernel, dt, sn, "sweep"))
        if q is not None:
            compared += 1
            add(d["ms"] <= q["ms"], f"{what} ms vs {SWEEP_PEER}",
                f"{d['ms']:.4g} ms vs {q['ms']:.4g} ms (target: not slower)")
        if sn >= 1 << SWEEP_COPY_FRACTION_LOG2_MIN:
            frac = d.get("copy_fraction")
            if frac is None:
                add(False, f"{what} copy_fraction", "no data")
            else:
                add(frac >= MIN_COPY_FRACTION, f"{what} copy_fraction", f"{frac:.3f} (target >= {MIN_COPY_FRACTION})")
    if sweep and not compared:
        add(False, f"sweep vs {SWEEP_PEER}", "no data (no size measured on both sides)")

    for kernel, peer, min_speedup in BLOCK_TARGETS:
        found = [k for k in rows if k[0] == "dropfuse" and k[1] == "dropfuse" and k[2] == kernel]
        if not found:
            add(False, f"{kernel} speed-up vs {peer}", "no data")
            continue
        for key in found:
            d = rows[key]
            q = block_peer(rows, kernel, key[3], key[4], peer)
            what = f"{kernel} {key[3]} {d.get('shape', key[4])} speed-up vs {peer}"
            if q is None or not d["ms"]:
                add(False, what, "no data")
                continue
            s = q["ms"] / d["ms"]
            tag = " (peer re-implemented: library not installed)" if q["impl"].endswith("(reimpl)") else ""
            add(s >= min_speedup, what + tag, f"{s:.2f}x (target >= {min_speedup}x; {q['ms']:.4f} / {d['ms']:.4f} ms)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", metavar="RESULTS.jsonl")
    ap.add_argument("--write-json", metavar="FILE", help="write the joined rows as a JSON array")
    ap.add_argument("--update", metavar="FILE", help="replace the generated section of FILE (e.g. BENCHMARKS.md)")
    ap.add_argument("--check", action="store_true", help="PASS/FAIL per acceptance target; exit 1 on any FAIL")
    args = ap.parse_args(argv)

    rows = load(args.inputs)
    if not rows:
        print("no rows with \"impl\" in the inputs", file=sys.stderr)
    command = "python3 scripts/bench_report.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = report(rows, command)
    print(text)

    if args.write_json:
        os.makedirs(os.path.dirname(args.write_json) or ".", exist_ok=True)
        with open(args.write_json, "w") as fh:
            json.dump(join(rows), fh, indent=2, sort_keys=True)
            fh.write("\n")
    if args.update:
        update(args.update, text)
    if args.check:
        results = check(rows)
        for _, line in results:
            print(line)
        failed = sum(1 for ok, _ in results if not ok)
        print(f"check: {len(results) - failed} passed, {failed} failed")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
