#!/usr/bin/env python3
"""Tests of scripts/bench_report.py on hand-made JSON lines (Python 3 standard library only; no GPU,
no torch): every kernel family's table and acceptance targets (PASS, FAIL with the bandwidth-floor
arithmetic, MISSING), copy rows of several families at the same dtype and n, duplicates, the
bias + dropout + residual rows that still carry dropout's kernel names, --families, --update and
--write-json, and the committed H200 results (the BENCHMARKS.md section and the 111/5 check).

  python3 scripts/test_bench_report.py [-v]
"""
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import sys
import tempfile
import unittest

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the working tree
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_spec = importlib.util.spec_from_file_location("bench_report", os.path.join(HERE, "bench_report.py"))
br = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(br)

N28 = 1 << 28
BLOCK_N = 64 * 256 * 56 * 56
META = dict(gpu="NVIDIA H200", date="2026-12-01", commit="abc1234")
SIZE = {"f16": 2, "bf16": 2, "f32": 4}


def row(side, impl, kernel, dtype, n, ms, nbytes, copy=None, method="burst", **extra):
    """One JSON row as the benches and peer scripts write it; copy = (copy_ms, copy_bytes)."""
    r = dict(impl=impl, kernel=kernel, dtype=dtype, n=n, method=method, launches=10, repeats=20, ms=ms,
             bytes=nbytes, gbps=nbytes / ms / 1e6 if ms else None)
    if copy is not None:
        cms, cbytes = copy
        cg = cbytes / cms / 1e6
        r.update(copy_ms=cms, copy_gbps=cg, copy_fraction=r["gbps"] / cg)
    r.update(META)
    r["side"] = side
    if side == "peer":
        r["torch"] = "2.11.0+cu130"
    r.update(extra)
    return r


class Case:
    """Emits one bench's (or peer script's) rows: its copy first, then kernel rows against it."""

    def __init__(self, out, side, dtype, n, copy_gbps=4000.0, **extra):
        self.out, self.side, self.dtype, self.n, self.extra = out, side, dtype, n, extra
        self.copy_bytes = 2 * n * SIZE[dtype]
        self.copy = (self.copy_bytes / copy_gbps / 1e6, self.copy_bytes)
        out.append(row(side, "copy", "copy", dtype, n, self.copy[0], self.copy_bytes, self.copy, **extra))

    def kernel(self, impl, kernel, ms=None, nbytes=None, frac=None, **extra):
        """A row of `kernel`: either ms given, or the copy fraction `frac` (ms derived)."""
        nbytes = nbytes or self.copy_bytes
        if ms is None:
            ms = nbytes / (frac * self.copy_bytes / self.copy[0])
        impl = impl if self.side == "peer" else "dropfuse"
        self.out.append(row(self.side, impl, kernel, self.dtype, self.n, ms, nbytes, self.copy,
                            **dict(self.extra, **extra)))
        return ms


# ---------------------------------------------------------------------------------------------
# One hand-made run per family, in the benches' emission order. `ok` makes every target pass;
# ok=False makes the speed-ups miss (by a factor 0.5) and the copy fractions miss (0.7).


def dropout_run(d, p, ok=True):
    for dt in ("f16", "bf16", "f32"):
        c = Case(d, "dropfuse", dt, N28, p=0.1)
        pc = Case(p, "peer", dt, N28, p=0.1)
        nb = 2 * N28 * SIZE[dt]
        ms = {k: c.kernel(None, k, nbytes=nb + N28 // 8, frac=0.95 if ok else 0.7)
              for k in ("forward_mask", "backward_mask")}
        ms["forward_maskless"] = c.kernel(None, "forward_maskless", nbytes=nb, frac=0.97)
        c.kernel(None, "mask", nbytes=N28 // 8, frac=0.04)
        f = 1.0 if ok else 0.5
        pc.kernel("torch.native_dropout", "forward_mask", ms=ms["forward_mask"] * 1.6 * f, nbytes=nb)
        pc.kernel("torch.native_dropout", "backward_mask", ms=ms["backward_mask"] * 1.2 * f, nbytes=nb)
        pc.kernel("triton.seeded_dropout", "forward_maskless", ms=ms["forward_maskless"] * 3.5 * f, nbytes=nb)
        for n in (1 << 20, 1 << 26):
            for side, out in (("dropfuse", d), ("peer", p)):
                cb = 2 * n * SIZE[dt]
                out.append(row(side, "copy", "copy", dt, n, cb / 4000 / 1e6, cb, method="sweep"))
            for k in br.SWEEP_KERNELS:
                cb = 2 * n * SIZE[dt]
                dms = cb / (0.95 * 4000) / 1e6
                d.append(row("dropfuse", "dropfuse", k, dt, n, dms, cb, (cb / 4000 / 1e6, cb), method="sweep"))
                p.append(row("peer", "torch.native_dropout", k, dt, n, dms * 1.3, cb, method="sweep"))


def drop_block_run(d, p, ok=True):
    shape = dict(shape="64x256x56x56", block_size=7)
    c = Case(d, "dropfuse", "f16", BLOCK_N, **shape)
    ms = c.kernel(None, "drop_block_2d_forward", frac=0.3)
    pc = Case(p, "peer", "f16", BLOCK_N, copy_gbps=3900.0)
    f = 1.0 if ok else 0.5
    pc.kernel("timm.drop_block_2d", "drop_block_2d_forward", ms=ms * 5 * f)
    pc.kernel("torchvision.drop_block2d", "drop_block_2d_forward", ms=ms * 30 * f)


def bdr_run(d, p, ok=True, legacy_names=False):
    """Bias + dropout + residual; legacy_names: the kernel names of the residual branch today
    (forward_mask ... with a "bias" field) instead of bias_dropout_residual_*."""
    pre = "" if legacy_names else "bias_dropout_residual_"
    extra = dict(shape="65536x4096", bias=True, p=0.1)
    f = 1.0 if ok else 0.5
    for dt in ("bf16", "f16", "f32"):
        c = Case(d, "dropfuse", dt, N28, copy_gbps=4100.0, **extra)
        pc = Case(p, "peer", dt, N28, copy_gbps=4100.0, **extra)
        nb = 3 * N28 * SIZE[dt]
        for k in ("forward_mask", "forward_maskless", "backward_mask", "backward_maskless"):
            ms = c.kernel(None, pre + k, nbytes=nb, frac=0.9 if ok else 0.7)
            if k != "backward_maskless":
                pc.kernel("torch.eager.bias_dropout_residual", pre + k, ms=ms * 3.5, nbytes=nb)
                pc.kernel("torch.compile.bias_dropout_residual", pre + k, ms=ms * 2.5 * f, nbytes=nb)


def structured_run(d, p, ok=True):
    f = 1.0 if ok else 0.5
    c = Case(d, "dropfuse", "f16", BLOCK_N, copy_gbps=3800.0, shape="64x256x56x56", p=0.1)
    ms = {k: c.kernel(None, k, frac=0.9) for k in ("channel_2d_forward", "channel_2d_forward_maskless",
                                                   "channel_2d_backward")}
    c = Case(d, "dropfuse", "f32", 16 * 1024 * 1000, shape="16x1024x1000", p=0.1)
    ms["mc_summaries"] = c.kernel(None, "mc_summaries", frac=0.8)
    pc = Case(p, "peer", "f16", BLOCK_N, copy_gbps=3700.0)
    pc.kernel("torch.dropout2d", "channel_2d_forward_maskless", ms=ms["channel_2d_forward_maskless"] * 3 * f,
              shape="64x256x56x56")
    pc.kernel("torch.compile.dropout2d", "channel_2d_forward_maskless", ms=ms["channel_2d_forward_maskless"] * 2,
              shape="64x256x56x56")
    pc.kernel("torch.mask_mul", "channel_2d_backward", ms=ms["channel_2d_backward"] * 1.3, shape="64x256x56x56")
    pc = Case(p, "peer", "f32", 16 * 1024 * 1000)
    pc.kernel("torch.mc_summaries", "mc_summaries", ms=ms["mc_summaries"] * 9, shape="16x1024x1000")


def multi_sample_run(d, p, ok=True, head=True):
    f = 1.0 if ok else 0.5
    k, b, dd, c_ = 8, 1024, 2048, 1000
    for dt in ("f16", "bf16"):
        c = Case(d, "dropfuse", dt, k * b * c_, shape=f"{k}x{b}x{c_}", k=k, p=0.1, label_smoothing=0.1)
        ce = c.kernel(None, "weighted_ce_fwd_bwd", nbytes=c.copy_bytes + 8 * b, frac=0.8)
        c = Case(d, "dropfuse", dt, k * b * dd, shape=f"{k}x{b}x{dd}", k=k, p=0.1, label_smoothing=0.1)
        c.kernel(None, "multi_sample_copies", frac=0.9)
        c.kernel(None, "multi_sample_reduce", frac=0.9)
        head_ms = 0.5
        if head:
            d.append(row("dropfuse", "dropfuse", "head_fwd_bwd", dt, k * b * dd, head_ms, 3 * 10 ** 7,
                         shape=f"K{k}xB{b}xD{dd}xC{c_}"))
        pc = Case(p, "peer", dt, k * b * c_, shape=f"{k}x{b}x{c_}")
        for impl, fac in (("torch.eager", 20.0), ("torch.compile", 11.0 * f)):
            pc.kernel(impl, "weighted_ce_fwd_bwd", ms=ce * fac, nbytes=pc.copy_bytes + 8 * b, k=k)
            p.append(row("peer", impl, "head_fwd_bwd", dt, k * b * dd,
                         head_ms * (7.0 if impl == "torch.eager" else 4.5) * f, 3 * 10 ** 7,
                         shape=f"K{k}xB{b}xD{dd}xC{c_}"))


def skip_run(d, p, ok=True, reimpl=False):
    f = 1.0 if ok else 0.5
    c = Case(d, "dropfuse", "bf16", N28, copy_gbps=4200.0, shape="16x4096x4096", p=0.25, kept_samples=16)
    row_bytes = 4096 * 4096 * 2
    fwd = c.kernel(None, "stochastic_depth_forward", nbytes=3 * 16 * row_bytes, frac=0.9 if ok else 0.7)
    c.kernel(None, "stochastic_depth_forward_p25", nbytes=3 * 12 * row_bytes, frac=0.9, kept_samples=12)
    bwd = c.kernel(None, "stochastic_depth_backward", nbytes=28 * row_bytes, frac=0.9, kept_samples=12)
    comp = c.kernel(None, "sample_compaction", nbytes=56 * row_bytes, frac=0.9, kept_samples=12)
    pc = Case(p, "peer", "bf16", N28, copy_gbps=4150.0, shape="16x4096x4096", p=0.25, kept_samples=16)
    sd = "torchvision.stochastic_depth" + ("(reimpl)" if reimpl else "")
    pc.kernel(sd, "stochastic_depth_forward", ms=fwd * 2.8 * f, nbytes=3 * 16 * row_bytes)
    pc.kernel(sd, "stochastic_depth_backward", ms=bwd * 1.5, nbytes=32 * row_bytes)
    pc.kernel("torchtune.layer_dropout", "sample_compaction", ms=comp * 4.5 * f, nbytes=56 * row_bytes,
              kept_samples=12)


def routing_run(d, p, ok=True):
    f = 1.0 if ok else 0.5
    extra = dict(shape="16x4096x4096", k=2048, keep_fraction=0.5, selected=32768)
    c = Case(d, "dropfuse", "bf16", N28, copy_gbps=4300.0, **extra)
    ms = {k: c.kernel(None, k, nbytes=nb, frac=fr) for k, nb, fr in (
        ("routing_top_k_select", 4 * 65536 + 4 * 32768, 0.02), ("routing_global_select", 4 * 65536 + 4 * 32768, 0.02),
        ("routing_gather", 2 * 2 * 32768 * 4096, 0.9), ("routing_scatter_add", 3 * 2 * 32768 * 4096, 0.9),
        ("routing_forward", 5 * 2 * 32768 * 4096, 0.85))}
    pc = Case(p, "peer", "bf16", N28, copy_gbps=4250.0, **extra)
    for k, fac in (("routing_top_k_select", 2.0), ("routing_gather", 1.2), ("routing_forward", 3.4 * f)):
        pc.kernel("torch.eager", k, ms=ms[k] * fac)


def importance_run(d, p, ok=True):
    f = 1.0 if ok else 0.5
    for dt in ("bf16", "f16", "f32"):
        c = Case(d, "dropfuse", dt, N28, copy_gbps=4400.0, shape="65536x4096")
        ms = c.kernel(None, "importance", frac=0.9 if ok else 0.7)
        c.kernel(None, "importance_masked", nbytes=c.copy_bytes + 65536, frac=0.9)
        pc = Case(p, "peer", dt, N28, copy_gbps=4350.0, shape="65536x4096")
        pc.kernel("torch.cosine_similarity.fp32", "importance", ms=ms * 12 * f)
        pc.kernel("torch.cosine_similarity", "importance", ms=ms * 6)
        pc.kernel("torch.compile.cosine_similarity", "importance", ms=ms * 4)


RUNS = [dropout_run, drop_block_run, bdr_run, structured_run, multi_sample_run, skip_run, routing_run,
        importance_run]


def full_run(ok=True):
    """Every family's rows: all the Rust benches first, then all the peer scripts (as bench.sh)."""
    d, p = [], []
    for run in RUNS:
        run(d, p, ok)
    return d + p


class Base(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def write(self, rows, name="run.jsonl", extra_lines=()):
        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as fh:
            for r in rows:
                fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
            for line in extra_lines:
                fh.write(line + "\n")
        return path

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = br.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def check_lines(self, *argv):
        rc, out, _ = self.run_main(*argv, "--check")
        lines = [ln for ln in out.splitlines() if re.match(r"^(PASS|FAIL|MISSING) ", ln)]
        summary = [ln for ln in out.splitlines() if ln.startswith("check: ")]
        self.assertEqual(len(summary), 1, out)
        return rc, lines, summary[0], out

    @staticmethod
    def section(out, title):
        """The markdown of the section `### title` (up to the next section or the check lines)."""
        m = re.search(r"^### " + re.escape(title) + r"\n(.*?)(?=^### |^(?:PASS|FAIL|MISSING) |\Z)", out,
                      re.M | re.S)
        return m.group(1) if m else None

    @staticmethod
    def table_rows(text):
        return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines()
                if ln.startswith("| ") and not ln.startswith("| ---")]


class FamilyTargets(Base):
    def test_every_target_passes_on_a_passing_run(self):
        rc, lines, summary, out = self.check_lines(self.write(full_run(ok=True)))
        self.assertEqual(rc, 0, out)
        self.assertFalse([ln for ln in lines if not ln.startswith("PASS ")], out)
        self.assertRegex(summary, r"^check: \d+ passed, 0 failed$")
        for t in br.FAMILY_TARGETS:
            got = [ln for ln in lines if ln.startswith(f"PASS {t.kernel} ") and f"(issue {t.issue})" in ln]
            speed = [ln for ln in got if f"speed-up vs {t.peer}" in ln]
            frac = [ln for ln in got if " copy_fraction " in ln]
            self.assertEqual(len(speed), len(t.dtypes) if t.speedup else 0, (t, got))
            self.assertEqual(len(frac), len(t.dtypes) if t.copy_fraction else 0, (t, got))

    def test_every_target_fails_on_a_failing_run(self):
        rc, lines, summary, out = self.check_lines(self.write(full_run(ok=False)))
        self.assertEqual(rc, 1)
        for t in br.FAMILY_TARGETS:
            got = [ln for ln in lines if f" {t.kernel} " in ln and f"(issue {t.issue})" in ln]
            self.assertTrue(got, t)
            for ln in got:
                self.assertTrue(ln.startswith("FAIL "), ln)
        # Dropout's and DropBlock's own targets fail too (speed-ups at half, copy fractions 0.7).
        self.assertIn("FAIL burst forward_mask f16 n=2^28 copy_fraction: 0.700 (target >= 0.92)", lines)
        self.assertTrue(any(ln.startswith("FAIL drop_block_2d_forward f16 64x256x56x56 speed-up vs timm")
                            for ln in lines))
        self.assertNotIn("MISSING", out)

    def test_speed_up_floor_arithmetic(self):
        d, p = [], []
        c = Case(d, "dropfuse", "bf16", N28, shape="16x4096x4096")  # copy: 2^30 bytes
        c.copy = (0.25, c.copy_bytes)
        d[0] = row("dropfuse", "copy", "copy", "bf16", N28, 0.25, c.copy_bytes, c.copy, shape="16x4096x4096")
        c.kernel(None, "routing_forward", ms=1.0, nbytes=4_000_000_000)
        p.append(row("peer", "torch.eager", "routing_forward", "bf16", N28, 2.4, 4_000_000_000))
        _, lines, _, _ = self.check_lines(self.write(d + p), "--families", "routing")
        self.assertEqual(lines, [
            "FAIL routing_forward bf16 16x4096x4096 speed-up vs torch.eager (issue 6): 2.400x (target >= 3.0x; "
            "2.4000 / 1.0000 ms); unreachable: the target needs 0.8000 ms, moving dropfuse's 4000000000 bytes at "
            "the run's best bandwidth (4295 GB/s) takes 0.9313 ms"])
        d[1] = row("dropfuse", "dropfuse", "routing_forward", "bf16", N28, 1.0, 2_000_000_000, c.copy,
                   shape="16x4096x4096")
        _, lines, _, _ = self.check_lines(self.write(d + p), "--families", "routing")
        self.assertEqual(lines, [
            "FAIL routing_forward bf16 16x4096x4096 speed-up vs torch.eager (issue 6): 2.400x (target >= 3.0x; "
            "2.4000 / 1.0000 ms); reachable: at the run's best bandwidth (4295 GB/s) the bytes take 0.4657 ms"])

    def test_copy_fraction_target(self):
        d, p = [], []
        skip_run(d, p)
        d = [dict(r, copy_fraction=0.84) if r["kernel"] == "stochastic_depth_forward" else r for r in d]
        _, lines, _, _ = self.check_lines(self.write(d + p), "--families", "skip")
        self.assertIn("FAIL stochastic_depth_forward bf16 16x4096x4096 copy_fraction (issue 6): 0.840 "
                      "(target >= 0.85)", lines)
        self.assertTrue(any(ln.startswith("PASS stochastic_depth_forward bf16 16x4096x4096 speed-up vs "
                                          "torchvision.stochastic_depth (issue 6): 2.800x") for ln in lines), lines)

    def test_missing_rows_print_missing(self):
        rows = [r for r in full_run() if not (r["impl"] == "torch.eager" and r["kernel"] == "routing_forward")
                and not (r["side"] == "dropfuse" and r["kernel"] == "importance" and r["dtype"] == "bf16")
                and r["kernel"] != "head_fwd_bwd"]
        rc, lines, summary, out = self.check_lines(self.write(rows))
        self.assertEqual(rc, 1)
        self.assertIn("MISSING routing_forward bf16 16x4096x4096 speed-up vs torch.eager (issue 6): "
                      "no data (torch.eager)", lines)
        self.assertIn("MISSING importance bf16 65536x4096 copy_fraction (issue 6): no data (dropfuse)", lines)
        self.assertIn("MISSING importance bf16 65536x4096 speed-up vs torch.cosine_similarity.fp32 (issue 6): "
                      "no data (dropfuse)", lines)
        for dt in ("f16", "bf16"):
            for peer in ("torch.compile", "torch.eager"):
                self.assertIn(f"MISSING head_fwd_bwd {dt} n=2^24 speed-up vs {peer} (issue 5): "
                              f"no data (dropfuse, {peer})", lines)
        self.assertRegex(summary, r"^check: \d+ passed, 0 failed, 7 missing$")

    def test_empty_and_garbage_inputs_do_not_crash(self):
        path = self.write([], extra_lines=["not json", "[1, 2]", json.dumps({"kernel": "copy", "ms": 1.0}),
                                           json.dumps(dict(row("dropfuse", "dropfuse", "routing_forward", "bf16",
                                                               N28, 1.0, 1), ms=None))])
        rc, lines, summary, out = self.check_lines(path)
        self.assertEqual(rc, 1)
        self.assertTrue(lines)
        self.assertTrue(all(ln.startswith("MISSING ") for ln in lines), lines)
        self.assertRegex(summary, r"^check: 0 passed, 0 failed, \d+ missing$")
        self.assertIn("No burst results.", out)
        self.assertIsNone(self.section(out, "Token routing"))  # no rows: no section
        _, _, err = self.run_main(path)
        self.assertIn("not JSON", err)

    def test_reimplemented_peer(self):
        d, p = [], []
        skip_run(d, p, reimpl=True)
        rc, lines, _, out = self.check_lines(self.write(d + p), "--families", "skip")
        self.assertTrue(any(ln.startswith("PASS stochastic_depth_forward bf16 16x4096x4096 speed-up vs "
                                          "torchvision.stochastic_depth (peer re-implemented: library not "
                                          "installed) (issue 6): 2.800x") for ln in lines), lines)
        self.assertIn("`torchvision.stochastic_depth(reimpl)`", out)
        self.assertIn("\"(reimpl)\" = the peer script's re-implementation", out)


class Tables(Base):
    def test_family_sections_in_order_with_peer_lines(self):
        rc, out, _ = self.run_main(self.write(full_run()))
        self.assertEqual(rc, 0)
        titles = re.findall(r"^### (.*)$", out, re.M)
        self.assertEqual(titles, ["Burst", "Size sweep", "DropBlock", "Bias + dropout + residual",
                                  "Structured and Monte-Carlo dropout", "Multi-sample dropout",
                                  "Stochastic depth and per-sample compaction", "Token routing",
                                  "Attention-layer importance"])
        routing = self.table_rows(self.section(out, "Token routing"))
        self.assertEqual(routing[0], ["kernel", "dtype", "shape", "dropfuse ms", "GB/s", "of copy", "peer",
                                      "peer ms", "speed-up"])
        kernels = [r[0] for r in routing[1:6]]
        self.assertEqual(kernels, ["routing_top_k_select", "routing_global_select", "routing_gather",
                                   "routing_scatter_add", "routing_forward"])
        fwd = routing[5]
        self.assertEqual(fwd[1:3], ["bf16", "16x4096x4096"])
        self.assertEqual(fwd[5], "0.850")
        self.assertEqual((fwd[6], fwd[8]), ("`torch.eager`", "3.40x"))
        self.assertEqual(routing[2][6:], ["", "", ""])  # global select: no peer
        # Importance: three peers, one line each, in the family's peer order.
        imp = [r for r in self.table_rows(self.section(out, "Attention-layer importance"))
               if r[0] == "importance" and r[1] == "bf16"]
        self.assertEqual([r[6] for r in imp], ["`torch.cosine_similarity.fp32`", "`torch.cosine_similarity`",
                                              "`torch.compile.cosine_similarity`"])
        self.assertEqual([r[8] for r in imp], ["12.00x", "6.00x", "4.00x"])
        # Multi-sample: the head rows (GEMM-bound, no copy) and the loss rows.
        ms = self.table_rows(self.section(out, "Multi-sample dropout"))
        head = [r for r in ms if r[0] == "head_fwd_bwd" and r[1] == "f16"]
        self.assertEqual([(r[2], r[3], r[5], r[6], r[8]) for r in head],
                         [("K8xB1024xD2048xC1000", "0.5", "", "`torch.eager`", "7.00x"),
                          ("K8xB1024xD2048xC1000", "0.5", "", "`torch.compile`", "4.50x")])

    def test_peer_only_rows_are_shown(self):
        d, p = [], []
        multi_sample_run(d, p, head=False)
        rc, out, _ = self.run_main(self.write(d + p))
        head = [r for r in self.table_rows(self.section(out, "Multi-sample dropout")) if r[0] == "head_fwd_bwd"]
        self.assertEqual(len(head), 4)  # 2 dtypes x 2 peers, dropfuse columns empty
        self.assertTrue(all(r[3:6] == ["", "", ""] and r[8] == "" for r in head), head)

    def test_copies_of_the_same_dtype_and_n_stay_in_their_family(self):
        # dropout, bias+dropout+residual, skip, routing and importance all time a bf16 2^28 copy;
        # DropBlock and channel dropout both an f16 64x256x56x56 one; each side has its own.
        rows = full_run()
        rc, out, _ = self.run_main(self.write(rows))
        expect = {}
        for r in rows:
            if r["kernel"] == "copy":
                expect.setdefault((r["side"], r["dtype"], r["n"], r["method"]), set()).add(round(r["ms"], 9))
        self.assertTrue(len(expect[("dropfuse", "bf16", N28, "burst")]) >= 5)
        self.assertTrue(len(expect[("peer", "f16", BLOCK_N, "burst")]) == 2)
        loaded = br.load([self.write(rows, "again.jsonl")])
        copies = [k for k in loaded if k[3] == "copy"]
        self.assertEqual(len(copies), sum(1 for r in rows if r["kernel"] == "copy"))
        fam_of = {k[0] for k in copies if k[1:] == ("dropfuse", "copy", "copy", "bf16", N28, "burst")}
        self.assertEqual(fam_of, {"dropout", "bias_dropout_residual", "skip", "routing", "importance"})
        fam_of = {k[0] for k in copies if k[1:] == ("peer", "copy", "copy", "f16", BLOCK_N, "burst")}
        self.assertEqual(fam_of, {"drop_block", "structured"})
        # The dropout burst copy table still shows dropout's own copy (4000 GB/s), the routing
        # copy table routing's (4300 and 4250 GB/s).
        burst_copy = {r[0]: r for r in self.table_rows(self.section(out, "Burst").split("Copy baseline")[1])}
        self.assertEqual(burst_copy["bf16"][2], "4000.0")
        self.assertEqual(burst_copy["bf16"][4], "4000.0")
        routing_copy = self.table_rows(self.section(out, "Token routing").split("Copy baselines")[1])
        self.assertEqual(routing_copy[1][3:], ["4300.0", routing_copy[1][4], "4250.0"])

    def test_dropout_sections_unchanged_by_other_families(self):
        d, p = [], []
        dropout_run(d, p)
        drop_block_run(d, p)
        _, alone, _ = self.run_main(self.write(d + p, "alone.jsonl"))
        _, mixed, _ = self.run_main(self.write(full_run(), "alone.jsonl"))
        for title in ("Burst", "Size sweep", "DropBlock"):
            self.assertEqual(self.section(alone, title), self.section(mixed, title), title)
        _, lines_alone, _, _ = self.check_lines(self.write(d + p, "alone.jsonl"))
        _, lines_mixed, _, _ = self.check_lines(self.write(full_run(), "alone.jsonl"))
        legacy = [ln for ln in lines_mixed if "(issue " not in ln]
        self.assertEqual(legacy, [ln for ln in lines_alone if "(issue " not in ln])

    def test_bias_dropout_residual_rows_with_dropout_kernel_names(self):
        d, p = [], []
        dropout_run(d, p)
        bdr_run(d, p, legacy_names=True)
        rc, out, _ = self.run_main(self.write(d + p))
        d2, p2 = [], []
        dropout_run(d2, p2)
        bdr_run(d2, p2)
        rc2, out2, _ = self.run_main(self.write(d2 + p2, "renamed.jsonl"))
        self.assertEqual(out.split("\n", 1)[1].replace("run.jsonl", "X"), out2.split("\n", 1)[1].replace(
            "renamed.jsonl", "X"))
        bdr = self.table_rows(self.section(out, "Bias + dropout + residual"))
        self.assertEqual(bdr[1][0], "bias_dropout_residual_forward_mask")
        _, lines, _, _ = self.check_lines(self.write(d + p))
        self.assertTrue(any(ln.startswith("PASS bias_dropout_residual_forward_maskless bf16 65536x4096 speed-up vs "
                                          "torch.compile.bias_dropout_residual (issue 7): 2.500x") for ln in lines))

    def test_unknown_kernel_gets_its_own_section(self):
        rows = [row("dropfuse", "copy", "copy", "f16", 1024, 0.01, 4096),
                row("dropfuse", "dropfuse", "frobnicate", "f16", 1024, 0.02, 4096, (0.01, 4096)),
                row("peer", "torch.frob", "frobnicate", "f16", 1024, 0.04, 4096),
                row("peer", "x", "fancy", "f32", 8, 1.0, 64, family="fancy_family")]
        rc, out, _ = self.run_main(self.write(rows))
        self.assertEqual(self.table_rows(self.section(out, "other"))[1][6:], ["`torch.frob`", "0.04", "2.00x"])
        self.assertIn("fancy", self.section(out, "fancy_family"))


class Duplicates(Base):
    def test_last_row_read_wins(self):
        d, p = [], []
        routing_run(d, p)
        fwd = next(r for r in d if r["kernel"] == "routing_forward")
        slow = dict(fwd, ms=fwd["ms"] * 2)
        # In one file: the later (slower) row wins.
        _, lines, _, _ = self.check_lines(self.write(d + p + [slow]), "--families", "routing")
        self.assertTrue(lines[0].startswith("FAIL routing_forward") and "1.700x" in lines[0], lines)
        # Across files: the last file's row wins.
        first = self.write(d + p + [slow], "first.jsonl")
        second = self.write([fwd], "second.jsonl")
        _, lines, _, _ = self.check_lines(first, second, "--families", "routing")
        self.assertTrue(lines[0].startswith("PASS routing_forward") and "3.400x" in lines[0], lines)
        rc, out, _ = self.run_main(first, second)
        fwd_rows = [r for r in self.table_rows(self.section(out, "Token routing")) if r[0] == "routing_forward"]
        self.assertEqual(len(fwd_rows), 1)
        self.assertEqual(fwd_rows[0][8], "3.40x")


class Options(Base):
    def test_families_option(self):
        path = self.write(full_run())
        rc, lines, summary, out = self.check_lines(path, "--families", "routing,importance")
        self.assertEqual(re.findall(r"^### (.*)$", out, re.M), ["Token routing", "Attention-layer importance"])
        self.assertEqual(rc, 0)
        self.assertEqual(len(lines), 3)  # routing: 1; importance: copy fraction + speed-up
        rc, out, err = self.run_main(path, "--families", "routing,nonsense")
        self.assertIn("unknown family nonsense", err)

    def test_update_and_write_json(self):
        path = self.write(full_run())
        doc = os.path.join(self.tmp.name, "B.md")
        with open(doc, "w") as fh:
            fh.write("# Benchmarks\n\nhand-written\n")
        js = os.path.join(self.tmp.name, "out", "joined.json")
        rc, out, _ = self.run_main(path, "--update", doc, "--write-json", js)
        self.assertEqual(rc, 0)
        with open(doc) as fh:
            text = fh.read()
        self.assertTrue(text.startswith("# Benchmarks\n\nhand-written\n\n## Latest generated results\n"))
        self.assertIn("### Token routing", text)
        self.assertEqual(text.count(br.BEGIN), 1)
        rc, out, _ = self.run_main(path, "--update", doc, "--families", "skip")
        with open(doc) as fh:
            text = fh.read()
        self.assertEqual(text.count(br.BEGIN), 1)
        self.assertNotIn("### Token routing", text)
        self.assertIn("### Stochastic depth and per-sample compaction", text)
        with open(js) as fh:
            joined = json.load(fh)
        fams = [r["family"] for r in joined]
        legacy = [f in ("dropout", "drop_block") for f in fams]
        self.assertEqual(legacy, sorted(legacy, reverse=True))  # dropout and DropBlock rows first
        self.assertEqual(set(fams), set(br.FAMILY_ORDER))
        routing = [r for r in joined if r["family"] == "routing" and r["kernel"] == "routing_forward"]
        self.assertEqual(len(routing), 1)
        self.assertEqual(routing[0]["peer"], "torch.eager")
        self.assertAlmostEqual(routing[0]["speedup"], 3.4)
        self.assertEqual(routing[0]["shape"], "16x4096x4096")


class CommittedResults(Base):
    """The real H200 run of commit 6fd225b (dropout and DropBlock only)."""
    RESULTS = os.path.join(ROOT, "benches", "results", "2026-11-28-h200-6fd225b.jsonl")

    def setUp(self):
        super().setUp()
        if not os.path.exists(self.RESULTS):
            self.skipTest("no committed results file")

    def test_check_counts(self):
        rc, lines, summary, _ = self.check_lines(self.RESULTS)
        legacy = [ln for ln in lines if "(issue " not in ln]
        self.assertEqual(sum(ln.startswith("PASS ") for ln in legacy), 111)
        self.assertEqual(sum(ln.startswith("FAIL ") for ln in legacy), 5)
        self.assertFalse([ln for ln in lines if "(issue " in ln and not ln.startswith("MISSING ")])
        self.assertEqual(summary, f"check: 111 passed, 5 failed, {len(lines) - 116} missing")
        self.assertEqual(rc, 1)

    def test_benchmarks_md_section_reproduces(self):
        """The generated section of BENCHMARKS.md is what its own command produces today, when that
        command reads a committed results file."""
        with open(os.path.join(ROOT, "BENCHMARKS.md")) as fh:
            doc = fh.read()
        b, e = doc.find(br.BEGIN), doc.find(br.END)
        self.assertTrue(0 <= b < e)
        section = doc[b + len(br.BEGIN):e].strip("\n") + "\n"
        m = re.search(r"Produced by `(python3 scripts/bench_report.py [^`]*)`", section)
        self.assertIsNotNone(m)
        argv = shlex.split(m.group(1))[2:]
        inputs = [a for a in argv if a.endswith(".jsonl")]
        if not all(os.path.exists(os.path.join(ROOT, a)) for a in inputs):
            self.skipTest("the section's results file is not committed")
        families = argv[argv.index("--families") + 1].split(",") if "--families" in argv else None
        rows = br.load([os.path.join(ROOT, a) for a in inputs])
        if families:
            rows = {k: r for k, r in rows.items() if k[0] in families}
        self.assertEqual(br.report(rows, m.group(1), families), section)


if __name__ == "__main__":
    unittest.main()
