#!/usr/bin/env python3
"""Joins the benchmark results of both sides and reports them (Python 3 standard library only).

Usage:
  python3 scripts/bench_report.py RESULTS.jsonl [MORE.jsonl ...]
      [--write-json benches/results/NAME.json] [--update BENCHMARKS.md] [--check]
      [--families dropout,drop_block,...]

Inputs are the JSON lines that the Rust benches (`cargo bench`, side "dropfuse") and the peer scripts
`benches/peers/*_torch.py` (side "peer") append to $DROPFUSE_BENCH_JSON. Rows without "impl" (older
formats) or without "ms" are ignored.

Every row belongs to a kernel family (FAMILIES below; dropout and DropBlock are the original two): an
explicit "family" field wins; otherwise the kernel name decides (a prefix or an exact name per
family; rows with dropout's kernel names and a "bias" field are bias + dropout + residual rows, whose
kernel names get the "bias_dropout_residual_" prefix); a copy row (kernel "copy", the bandwidth
baseline every bench and peer script times before its kernels) belongs to the family of the next
non-copy row of the same side in the same file (of the previous one when none follows). So several
families can measure copies of the same dtype and n in one file without overwriting each other.
When the same (family, side, impl, kernel, dtype, n, method) appears more than once, the last one
read wins.

Each dropfuse row (impl "dropfuse") is joined with every peer row of the same family, kernel, dtype,
n and method; speed-up = peer_ms / ms.

  (always)      prints markdown tables: for dropout the burst table at the largest burst n and the
                sweep tables, for DropBlock its table, and for every other family with rows one table
                (kernel, dtype, shape, dropfuse ms, GB/s, fraction of the same run's copy, then one
                line per peer with its ms and the speed-up) and its copy baselines
  --write-json  writes the joined rows as a JSON array
  --update F    replaces the text between the GENERATED markers in F with the tables (appends a
                "## Latest generated results" section with the markers when F has none)
  --check       prints one PASS/FAIL/MISSING line per acceptance target (MISSING: a row the target
                needs is not in the inputs); exit status 1 if any target is not PASS
  --families    only these families (comma-separated) in the tables and the check
"""
import argparse
import collections
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


# ---------------------------------------------------------------------------------------------
# Kernel families. Dropout ("dropout") and DropBlock ("drop_block") keep their own tables and
# targets below; every other family gets the generic table (family_tables) and FAMILY_TARGETS.

# name: the family's id ("family" in the joined JSON, --families); title: its section heading;
# kernels: table order (and exact names that belong to it); prefixes: kernel-name prefixes that
# belong to it; peers: peer order in the table (others follow by name); note: the table's intro.
Family = collections.namedtuple("Family", "name title kernels prefixes peers note")
LEGACY_FAMILIES = ("dropout", "drop_block")
BDR_PREFIX = "bias_dropout_residual_"
FAMILIES = [
    Family("bias_dropout_residual", "Bias + dropout + residual",
           [BDR_PREFIX + k for k in ("forward_mask", "forward_maskless", "backward_mask", "backward_maskless")],
           (BDR_PREFIX,),
           ["torch.eager.bias_dropout_residual", "torch.compile.bias_dropout_residual"],
           "Fused bias + dropout + residual add, y = r + dropout(x + b) (issue 7); peers: "
           "`r + F.dropout(x + b)` eager and torch.compile."),
    Family("structured", "Structured and Monte-Carlo dropout",
           ["channel_2d_mask", "channel_2d_forward", "channel_2d_forward_maskless", "channel_2d_backward",
            "locked_forward", "locked_forward_maskless", "locked_backward",
            "embedding_rows_forward", "embedding_rows_forward_maskless", "embedding_rows_backward",
            "mc_replicas_forward_maskless", "mc_replicas_forward", "mc_summaries", "mc_summaries_unchecked"],
           ("channel_", "locked_", "embedding_rows_", "mc_"),
           ["torch.dropout2d", "torch.compile.dropout2d", "torch.mask_mul", "awd_lstm.locked_dropout",
            "torch.compile.locked_dropout", "awd_lstm.embedded_dropout", "torch.compile.embedded_dropout",
            "torch.dropout_loop", "torch.dropout_expand", "torch.mc_summaries", "torch.compile.mc_summaries"],
           "Channel, locked and embedding-row dropout, Monte-Carlo replicas and predictive summaries "
           "(issue 7); bytes are nominal (a dropped channel or row is not read)."),
    Family("multi_sample", "Multi-sample dropout",
           ["head_fwd_bwd", "weighted_ce_fwd_bwd", "multi_sample_copies", "multi_sample_reduce"],
           ("multi_sample_",),
           ["torch.eager", "torch.compile"],
           "Multi-sample dropout (issue 5): head forward + backward, the weighted cross-entropy "
           "(loss averaging) forward + backward, the K masked copies and the dh reduction; peers: the "
           "PyTorch loops, eager and torch.compile."),
    Family("skip", "Stochastic depth and per-sample compaction",
           ["stochastic_depth_forward", "stochastic_depth_forward_p25", "stochastic_depth_backward",
            "sample_compaction"],
           ("stochastic_depth_", "sample_compaction"),
           ["torchvision.stochastic_depth", "torchtune.layer_dropout"],
           "Fused stochastic-depth residual and per-sample compaction (issue 6); peers: torchvision "
           "`stochastic_depth(..., 'row')` + add, torchtune-style LayerDropout data movement."),
    Family("routing", "Token routing",
           ["routing_top_k_select", "routing_global_select", "routing_gather", "routing_scatter_add",
            "routing_forward"],
           ("routing_",),
           ["torch.eager"],
           "Token routing (issue 6): selection, gather, gated scatter-add and the three together; peer: "
           "PyTorch eager topk / index_select / index_add_."),
    Family("importance", "Attention-layer importance",
           ["importance", "importance_masked"],
           ("importance",),
           ["torch.cosine_similarity.fp32", "torch.cosine_similarity", "torch.compile.cosine_similarity"],
           "Attention-layer importance, per-token cosine similarity of a layer's input and output "
           "(issue 6); peers: `F.cosine_similarity` (fp32 upcast, native dtype, torch.compile)."),
]
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
FAMILY_ORDER = list(LEGACY_FAMILIES) + [f.name for f in FAMILIES]


def kernel_family(row):
    """The family a row's own fields name, or None for a copy row without them (see load).
    Renames bias + dropout + residual rows that carry dropout's kernel names."""
    kernel = str(row.get("kernel"))
    if row.get("family"):
        return str(row["family"])
    if kernel in KERNELS and "bias" in row:
        if kernel != "copy":
            row["kernel"] = BDR_PREFIX + kernel
        return "bias_dropout_residual"
    if kernel == "copy":
        return None
    if kernel in KERNELS:
        return "dropout"
    if is_drop_block(kernel):
        return "drop_block"
    for fam in FAMILIES:
        if kernel in fam.kernels or kernel.startswith(fam.prefixes):
            return fam.name
    return "other"


def load(paths):
    """{(family, side, impl, kernel, dtype, n, method): row}, the last occurrence winning."""
    rows = {}
    for path in paths:
        parsed = []
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
                if not isinstance(row, dict) or "impl" not in row:
                    continue
                row["side"] = side_of(row)
                parsed.append(row)
        # A copy row without a family of its own takes the next non-copy row's (same side), else
        # the previous one's, else dropout's.
        fams = [kernel_family(r) for r in parsed]
        after = {}
        for i in range(len(parsed) - 1, -1, -1):
            if fams[i] is None:
                fams[i] = after.get(parsed[i]["side"])
            elif parsed[i].get("kernel") != "copy":
                after[parsed[i]["side"]] = fams[i]
        before = {}
        for i, r in enumerate(parsed):
            if fams[i] is None:
                fams[i] = before.get(r["side"], "dropout")
            elif r.get("kernel") != "copy":
                before[r["side"]] = fams[i]
        for row, fam in zip(parsed, fams):
            if row.get("ms") is None:
                continue
            row["family"] = fam
            key = (fam, row["side"], row["impl"], row.get("kernel"), row.get("dtype"), row.get("n"),
                   row.get("method", "burst"))
            rows[key] = row
    return rows


def family_rows(rows, family):
    """The rows of one family, keyed (side, impl, kernel, dtype, n, method)."""
    return {k[1:]: r for k, r in rows.items() if k[0] == family}


def families_of(rows):
    """The families present, known ones in FAMILY_ORDER, then the others by name."""
    return sorted({k[0] for k in rows}, key=lambda f: (order(FAMILY_ORDER, f), f))


def sort_key(r):
    return (r["method"] != "burst", order(KERNELS, r["kernel"]), order(DTYPES, r["dtype"]), r["n"],
            order(PEER_ORDER, r["peer"]), r["peer"] or "")


def family_sort_key(r):
    fam = FAMILY_BY_NAME.get(r["family"])
    kernels, peers = (fam.kernels, fam.peers) if fam else ([], [])
    return (order(FAMILY_ORDER, r["family"]), r["family"], r["method"] != "burst", order(kernels, r["kernel"]),
            r["kernel"], order(DTYPES, r["dtype"]), str(r["dtype"]), r["n"] or 0, order(peers, r["peer"]),
            r["peer"] or "")


def join_family(frows, family):
    peers = {}
    for (side, impl, kernel, dtype, n, method), row in frows.items():
        if side == "peer" and impl != "copy":
            peers.setdefault((kernel, dtype, n, method), []).append(row)
    out = []
    for (side, impl, kernel, dtype, n, method), row in frows.items():
        if side != "dropfuse" or impl != "dropfuse":
            continue
        base = dict(family=family, kernel=kernel, dtype=dtype, n=n, shape=row.get("shape"), method=method,
                    ms=row["ms"], bytes=row.get("bytes"), gbps=row.get("gbps"), copy_ms=row.get("copy_ms"),
                    copy_fraction=row.get("copy_fraction"), peer=None, peer_ms=None, peer_copy_fraction=None,
                    speedup=None, gpu=row.get("gpu"), date=row.get("date"), commit=row.get("commit"))
        matches = peers.get((kernel, dtype, n, method), [])
        if not matches:
            out.append(base)
        for p in matches:
            r = dict(base)
            r.update(peer=p["impl"], peer_ms=p["ms"], peer_copy_fraction=p.get("copy_fraction"),
                     speedup=p["ms"] / row["ms"] if row["ms"] else None)
            out.append(r)
    return out


def join(rows):
    """The joined rows of every family: dropout and DropBlock first, in their original order."""
    legacy, other = [], []
    for fam in families_of(rows):
        (legacy if fam in LEGACY_FAMILIES else other).extend(join_family(family_rows(rows, fam), fam))
    legacy.sort(key=sort_key)
    other.sort(key=family_sort_key)
    return legacy + other


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


def burst_n(rows):
    ns = [k[4] for k in rows if k[5] == "burst" and k[0] == "dropfuse"] or [k[4] for k in rows if k[5] == "burst"]
    return max(ns) if ns else None


def burst_tables(rows):
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


def family_peers(fam, names):
    peers = fam.peers if fam else []
    return sorted(names, key=lambda p: (order(peers, p.replace("(reimpl)", "")), p))


def family_tables(family, rows):
    """The generic table of one family (rows keyed (side, impl, kernel, dtype, n, method)): one line
    per dropfuse kernel row and peer, then the copy baselines."""
    fam = FAMILY_BY_NAME.get(family)
    kernels = fam.kernels if fam else []
    cases = sorted({k[2:] for k in rows if k[2] != "copy" and (k[0] == "peer" or k[1] == "dropfuse")},
                   key=lambda c: (c[3] != "burst", order(kernels, c[0]), str(c[0]), order(DTYPES, c[1]), str(c[1]),
                                  c[2] or 0, c[3]))
    if not cases:
        return [f"No {fam.title if fam else family} results."]
    peer_names = {k[1] for k in rows if k[0] == "peer" and k[1] != "copy"}
    note = fam.note + " " if fam else ""
    lines = [f"{note}ms per call (median of event-timed windows); \"of copy\" = the row's bandwidth (bytes as the "
             "bench counts them) over a device copy of the case's data in the same run; speed-up = peer ms / "
             "dropfuse ms; one line per peer."
             + (" \"(reimpl)\" = the peer script's re-implementation, timed because the library was not installed."
                if any(p.endswith("(reimpl)") for p in peer_names) else ""), ""]
    header = ["kernel", "dtype", "shape", "dropfuse ms", "GB/s", "of copy", "peer", "peer ms", "speed-up"]
    align = ["---", "---", "---", "---:", "---:", "---:", "---", "---:", "---:"]
    body = []
    for kernel, dtype, n, method in cases:
        d = rows.get(("dropfuse", "dropfuse", kernel, dtype, n, method))
        peers = family_peers(fam, [k[1] for k in rows
                                   if k[0] == "peer" and k[1] != "copy" and k[2:] == (kernel, dtype, n, method)])
        shape = next((r["shape"] for r in [d] + [rows[("peer", p, kernel, dtype, n, method)] for p in peers]
                      if r and r.get("shape")), log2_label(n))
        label = kernel if method == "burst" else f"{kernel} ({method})"
        left = [label, dtype, shape]
        left += [fmt_ms(d["ms"]), fmt(d.get("gbps"), ".1f"), fmt(d.get("copy_fraction"), ".3f")] if d else ["", "", ""]
        for p in peers or [None]:
            q = rows.get(("peer", p, kernel, dtype, n, method)) if p else None
            if q is None:
                body.append(left + ["", "", ""])
            else:
                speedup = fmt(q["ms"] / d["ms"], ".2f", "x") if d and d["ms"] else ""
                body.append(left + [f"`{p}`", fmt_ms(q["ms"]), speedup])
    lines += table(header, align, body)
    copies = sorted({k[3:] for k in rows if k[1] == "copy"}, key=lambda c: (c[2] != "burst", order(DTYPES, c[0]),
                                                                         str(c[0]), c[1] or 0, c[2]))
    if copies:
        lines += ["", "Copy baselines (device to device, read + write of the case's data):", ""]
        body = []
        for dtype, n, method in copies:
            d = rows.get(("dropfuse", "copy", "copy", dtype, n, method))
            q = rows.get(("peer", "copy", "copy", dtype, n, method))
            shape = next((r["shape"] for r in (d, q) if r and r.get("shape")), log2_label(n))
            body.append([dtype, shape, fmt_ms(d and d["ms"]), fmt(d and d.get("gbps"), ".1f"), fmt_ms(q and q["ms"]),
                         fmt(q and q.get("gbps"), ".1f")])
        lines += table(["dtype", "shape", "dropfuse side ms", "GB/s", "peer side ms", "GB/s"],
                       ["---", "---", "---:", "---:", "---:", "---:"], body)
    return lines


def uniq(rows, field, side=None):
    vals = sorted({str(r.get(field)) for r in rows.values() if r.get(field) and (side is None or r["side"] == side)})
    return ", ".join(vals) if vals else "unknown"


def report(rows, command, families=None):
    """The generated section; `families` (None: all) limits it to those families."""
    def want(f):
        return families is None or f in families

    sections = []
    if want("dropout"):
        dropout = family_rows(rows, "dropout")
        sections += [("Burst", burst_tables(dropout)), ("Size sweep", sweep_tables(dropout))]
    if want("drop_block"):
        sections.append(("DropBlock", drop_block_tables(family_rows(rows, "drop_block"))))
    for family in families_of(rows):
        if family not in LEGACY_FAMILIES and want(family):
            fam = FAMILY_BY_NAME.get(family)
            sections.append((fam.title if fam else family, family_tables(family, family_rows(rows, family))))
    lines = [f"GPU {uniq(rows, 'gpu')}, {uniq(rows, 'date')} (UTC), commit {uniq(rows, 'commit', 'dropfuse')}; "
             f"torch {uniq(rows, 'torch', 'peer')}. Produced by `{command}`."]
    for title, body in sections:
        lines += ["", f"### {title}", ""] + body
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


MISSING = None  # the third verdict: a row the target needs is not in the inputs


def verdict(ok):
    return "MISSING" if ok is MISSING else "PASS" if ok else "FAIL"


def check_dropout(rows):
    """[(ok, line)] for dropout's targets (rows: the dropout family's)."""
    res = []
    n = 1 << CHECK_LOG2_N
    nl = log2_label(n)

    def add(ok, what, detail):
        res.append((ok, f"{verdict(ok)} {what}: {detail}"))

    for kernel, dtypes, peer, min_speedup in BURST_TARGETS:
        if dtypes is None:
            dtypes = sorted({k[3] for k in rows if k[0] == "dropfuse" and k[1] == "dropfuse" and k[2] == kernel
                             and k[4] == n and k[5] == "burst"}, key=lambda d: order(DTYPES, d))
            if not dtypes:
                add(MISSING, f"burst {kernel} n={nl}", "no data")
                continue
        for dt in dtypes:
            what = f"burst {kernel} {dt} n={nl}"
            d = rows.get(("dropfuse", "dropfuse", kernel, dt, n, "burst"))
            q = rows.get(("peer", peer, kernel, dt, n, "burst"))
            frac = d and d.get("copy_fraction")
            if frac is None:
                add(MISSING, f"{what} copy_fraction", "no data")
            else:
                add(frac >= MIN_COPY_FRACTION, f"{what} copy_fraction", f"{frac:.3f} (target >= {MIN_COPY_FRACTION})")
            if d is None or q is None:
                missing = [name for name, r in (("dropfuse", d), (peer, q)) if r is None]
                add(MISSING, f"{what} speed-up vs {peer}", f"no data ({', '.join(missing)})")
            elif not d["ms"]:
                add(False, f"{what} speed-up vs {peer}", "no data (ms 0)")
            else:
                s = q["ms"] / d["ms"]
                detail = f"{s:.3f}x (target >= {min_speedup}x; {q['ms']:.4f} / {d['ms']:.4f} ms)"
                if s < min_speedup:
                    detail += bound_note(rows, d, q, min_speedup)
                add(s >= min_speedup, f"{what} speed-up vs {peer}", detail)

    sweep = [k for k in rows if k[0] == "dropfuse" and k[1] == "dropfuse" and k[2] in SWEEP_KERNELS and k[5] == "sweep"]
    if not sweep:
        add(MISSING, "sweep", "no data")
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
                add(MISSING, f"{what} copy_fraction", "no data")
            else:
                add(frac >= MIN_COPY_FRACTION, f"{what} copy_fraction", f"{frac:.3f} (target >= {MIN_COPY_FRACTION})")
    if sweep and not compared:
        add(MISSING, f"sweep vs {SWEEP_PEER}", "no data (no size measured on both sides)")
    return res


def check_drop_block(rows):
    """[(ok, line)] for DropBlock's targets (rows: the drop_block family's)."""
    res = []

    def add(ok, what, detail):
        res.append((ok, f"{verdict(ok)} {what}: {detail}"))

    for kernel, peer, min_speedup in BLOCK_TARGETS:
        found = [k for k in rows if k[0] == "dropfuse" and k[1] == "dropfuse" and k[2] == kernel]
        if not found:
            add(MISSING, f"{kernel} speed-up vs {peer}", "no data")
            continue
        for key in found:
            d = rows[key]
            q = block_peer(rows, kernel, key[3], key[4], peer)
            what = f"{kernel} {key[3]} {d.get('shape', key[4])} speed-up vs {peer}"
            if q is None:
                add(MISSING, what, "no data")
                continue
            if not d["ms"]:
                add(False, what, "no data (ms 0)")
                continue
            s = q["ms"] / d["ms"]
            tag = " (peer re-implemented: library not installed)" if q["impl"].endswith("(reimpl)") else ""
            add(s >= min_speedup, what + tag, f"{s:.2f}x (target >= {min_speedup}x; {q['ms']:.4f} / {d['ms']:.4f} ms)")
    return res


# The other families' acceptance targets (issues 5, 6 and 7), checked at the issue's shape: the rows
# of `kernel` with this dtype and n, method "burst". peer: the peer's impl (its "(reimpl)" variant,
# the peer script's re-implementation, stands in when the library is missing); speedup: minimum
# peer ms / dropfuse ms, or None; copy_fraction: minimum fraction of the same run's copy bandwidth,
# or None; floor: say whether a missed speed-up is reachable at the best bandwidth of the run (not
# for GEMM-bound rows).
Target = collections.namedtuple("Target", "issue family kernel dtypes n peer speedup copy_fraction floor")
HIDDEN = 16 * 4096 * 4096  # issue 6 and 7's bf16 16 x 4096 x 4096
FAMILY_TARGETS = [
    # Issue 5: K = 8, B = 1024, D = 2048, C = 1000. The head row's n is K * B * D (the peer script's).
    Target(5, "multi_sample", "head_fwd_bwd", ("f16", "bf16"), 8 * 1024 * 2048, "torch.compile", 4.0, None, False),
    Target(5, "multi_sample", "head_fwd_bwd", ("f16", "bf16"), 8 * 1024 * 2048, "torch.eager", 6.0, None, False),
    Target(5, "multi_sample", "weighted_ce_fwd_bwd", ("f16", "bf16"), 8 * 1024 * 1000, "torch.compile", 10.0, None,
           True),
    # Issue 6: bf16, hidden 16 x 4096 x 4096.
    Target(6, "skip", "stochastic_depth_forward", ("bf16",), HIDDEN, "torchvision.stochastic_depth", 2.5, 0.85, True),
    Target(6, "routing", "routing_forward", ("bf16",), HIDDEN, "torch.eager", 3.0, None, True),
    Target(6, "skip", "sample_compaction", ("bf16",), HIDDEN, "torchtune.layer_dropout", 4.0, None, True),
    Target(6, "importance", "importance", ("bf16",), HIDDEN, "torch.cosine_similarity.fp32", 10.0, 0.85, True),
    # Issue 7: bias + dropout + residual bf16 16 x 4096 x 4096 (both forwards); channel dropout f16
    # 64 x 256 x 56 x 56 (the mask-free forward: F.dropout2d keeps no mask).
    Target(7, "bias_dropout_residual", BDR_PREFIX + "forward_mask", ("bf16",), HIDDEN,
           "torch.compile.bias_dropout_residual", 2.3, 0.85, True),
    Target(7, "bias_dropout_residual", BDR_PREFIX + "forward_maskless", ("bf16",), HIDDEN,
           "torch.compile.bias_dropout_residual", 2.3, 0.85, True),
    Target(7, "structured", "channel_2d_forward_maskless", ("f16",), 64 * 256 * 56 * 56, "torch.dropout2d", 2.5, None,
           True),
]


def floor_note(rows, d, q, min_speedup):
    """bound_note for the other families: the best bandwidth is the best of the family's copies at
    the same n (either side) and the peer's own."""
    best = [r["gbps"] for k, r in rows.items() if k[2] == "copy" and k[4] == d["n"] and k[5] == d.get("method", "burst")
            and r.get("gbps")] + ([q["gbps"]] if q.get("gbps") else [])
    if not best or not d.get("bytes"):
        return ""
    best = max(best)
    need_ms = q["ms"] / min_speedup
    floor_ms = d["bytes"] / best / 1e6
    if floor_ms > need_ms:
        return (f"; unreachable: the target needs {need_ms:.4f} ms, moving dropfuse's {d['bytes']} bytes "
                f"at the run's best bandwidth ({best:.0f} GB/s) takes {floor_ms:.4f} ms")
    return f"; reachable: at the run's best bandwidth ({best:.0f} GB/s) the bytes take {floor_ms:.4f} ms"


def check_target(t, rows):
    """[(ok, line)] for one Target (rows: its family's)."""
    res = []
    for dt in t.dtypes:
        d = rows.get(("dropfuse", "dropfuse", t.kernel, dt, t.n, "burst"))
        q = None
        if t.speedup is not None:
            q = rows.get(("peer", t.peer, t.kernel, dt, t.n, "burst")) or rows.get(
                ("peer", t.peer + "(reimpl)", t.kernel, dt, t.n, "burst"))
        shape = next((r["shape"] for r in (d, q) if r and r.get("shape")), f"n={log2_label(t.n)}")
        what = f"{t.kernel} {dt} {shape}"
        issue = f" (issue {t.issue})"

        def add(ok, label, detail):
            res.append((ok, f"{verdict(ok)} {what} {label}{issue}: {detail}"))

        if t.copy_fraction is not None:
            frac = d and d.get("copy_fraction")
            if frac is None:
                add(MISSING, "copy_fraction", "no data (dropfuse)" if d is None else "no data (copy_fraction)")
            else:
                add(frac >= t.copy_fraction, "copy_fraction", f"{frac:.3f} (target >= {t.copy_fraction})")
        if t.speedup is not None:
            label = f"speed-up vs {t.peer}"
            if d is None or q is None:
                missing = [name for name, r in (("dropfuse", d), (t.peer, q)) if r is None]
                add(MISSING, label, f"no data ({', '.join(missing)})")
                continue
            if q["impl"].endswith("(reimpl)"):
                label += " (peer re-implemented: library not installed)"
            if not d["ms"]:
                add(False, label, "no data (ms 0)")
                continue
            s = q["ms"] / d["ms"]
            detail = f"{s:.3f}x (target >= {t.speedup}x; {q['ms']:.4f} / {d['ms']:.4f} ms)"
            if s < t.speedup and t.floor:
                detail += floor_note(rows, d, q, t.speedup)
            add(s >= t.speedup, label, detail)
    return res


def check(rows, families=None):
    """[(ok, line)] for every acceptance target (ok: True, False or MISSING); `families` (None: all)
    limits it to the targets of those families."""
    def want(f):
        return families is None or f in families

    res = []
    if want("dropout"):
        res += check_dropout(family_rows(rows, "dropout"))
    if want("drop_block"):
        res += check_drop_block(family_rows(rows, "drop_block"))
    for t in FAMILY_TARGETS:
        if want(t.family):
            res += check_target(t, family_rows(rows, t.family))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", metavar="RESULTS.jsonl")
    ap.add_argument("--write-json", metavar="FILE", help="write the joined rows as a JSON array")
    ap.add_argument("--update", metavar="FILE", help="replace the generated section of FILE (e.g. BENCHMARKS.md)")
    ap.add_argument("--check", action="store_true",
                    help="PASS/FAIL/MISSING per acceptance target; exit 1 unless every one passes")
    ap.add_argument("--families", metavar="LIST",
                    help="comma-separated families (" + ", ".join(FAMILY_ORDER) + ") for the tables and the check")
    args = ap.parse_args(argv)
    rows = load(args.inputs)
    if not rows:
        print("no rows with \"impl\" in the inputs", file=sys.stderr)
    families = None
    if args.families:
        families = {f.strip() for f in args.families.split(",") if f.strip()}
        known = set(FAMILY_ORDER) | {k[0] for k in rows}
        unknown = sorted(families - known)
        if unknown:
            print(f"--families: unknown family {', '.join(unknown)} (known: {', '.join(sorted(known))})",
                  file=sys.stderr)
        rows = {k: r for k, r in rows.items() if k[0] in families}
    command = "python3 scripts/bench_report.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = report(rows, command, families)
    print(text)

    if args.write_json:
        os.makedirs(os.path.dirname(args.write_json) or ".", exist_ok=True)
        with open(args.write_json, "w") as fh:
            json.dump(join(rows), fh, indent=2, sort_keys=True)
            fh.write("\n")
    if args.update:
        update(args.update, text)
    if args.check:
        results = check(rows, families)
        for _, line in results:
            print(line)
        failed = sum(1 for ok, _ in results if ok is not MISSING and not ok)
        missing = sum(1 for ok, _ in results if ok is MISSING)
        passed = len(results) - failed - missing
        print(f"check: {passed} passed, {failed} failed" + (f", {missing} missing" if missing else ""))
        return 1 if failed or missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
