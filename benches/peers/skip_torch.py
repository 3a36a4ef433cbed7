#!/usr/bin/env python3
"""Peer side of the compute-skipping benchmark (benches/skip.rs): times PyTorch eager equivalents of
the stochastic-depth residual and of per-sample compaction on the same GPU, with the same method and
JSON-lines schema as benches/peers/dropout_torch.py (CUDA events around LAUNCHES back-to-back calls,
REPEATS such windows after WARMUP calls, median per call; the timing helpers and the reporter are
imported from it).

Usage:
  python3 benches/peers/skip_torch.py [--quick]
  DROPFUSE_BENCH_JSON=results.jsonl DROPFUSE_COMMIT=$(git rev-parse --short HEAD) \\
      python3 benches/peers/skip_torch.py

  --quick   16 x 1024 x 1024 instead of 16 x 4096 x 4096, for a smoke run

Cases: bf16, B = 16 samples of 4096 x 4096 elements ("n" = 2^28), p = 0.25, method "burst"
(10 launches per window, 20 windows, 5 warm-up calls):

  impl                          kernel                     what is timed
  copy                          copy                       dst.copy_(x) (the baseline)
  torchvision.stochastic_depth  stochastic_depth_forward   residual + torchvision.ops.stochastic_depth(
                                                           branch, p, "row", training=True)
  torchvision.stochastic_depth  stochastic_depth_backward  torch.autograd.grad(y, branch, dy,
                                                           retain_graph=True) of that y (one multiply of
                                                           dy by the saved per-row noise)
  torchtune.layer_dropout       sample_compaction          torchtune LayerDropout's data movement with
                                                           an identity layer: ind = keep.nonzero(),
                                                           xs = index_select(x, 0, ind), out = x.clone(),
                                                           out[ind] = xs (index_put_, as torchtune writes
                                                           it)

Keep decisions: torchvision draws its own per-row Bernoulli noise every call (as in training);
torchtune-style rows use fixed flags on the device with samples 3, 7, 11 and 15 dropped (the flags of
benches/skip.rs; torchtune draws them on the CPU each call, which would add a host-to-device copy).
keep.nonzero() synchronizes with the host, as torchtune's code does.

Bytes counted (the same formulas as benches/skip.rs, so gbps and copy_fraction compare directly):
forward: read residual + read branch + write the sum, 3 * n * 2; backward: read dy + write d_branch,
2 * n * 2; sample_compaction: the minimal traffic of gather + scatter-back, read + write of the 12
kept rows, then read + write of all 16 rows (the peer's clone and index_put move more, not counted).

Fallback: when torchvision.ops.stochastic_depth cannot be imported the rows time this script's
re-implementation (sd_equiv below: the same math as torchvision, written in torch) and the impl name
is "torchvision.stochastic_depth(reimpl)", with reimpl=true and the reason in the JSON rows. A peer
that fails prints `PEER_SKIPPED impl=... dtype=... reason=...` and the script goes on; without torch
or a CUDA device it prints one PEER_SKIPPED line and exits with status 0.

Environment:
  DROPFUSE_BENCH_JSON       file to append JSON lines to
  DROPFUSE_COMMIT           commit recorded in the JSON rows (default "unknown")
"""
import argparse
import os
import sys
import time

P = 0.25
BATCH = 16
DROPPED = (3, 7, 11, 15)
LAUNCHES, REPEATS, WARMUP = 10, 20, 5

torch = None
common = None


def skipped(impl, dtype, err):
    """Same line as dropout_torch.skipped, usable before torch (and dropout_torch) are imported."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300] if isinstance(err, BaseException) \
        else " ".join(str(err).split())[:300]
    print(f"PEER_SKIPPED impl={impl} dtype={dtype} reason={reason}", flush=True)


def sd_equiv(x, p, mode="row", training=True):
    """torchvision.ops.stochastic_depth, re-implemented: one Bernoulli(1 - p) draw per row (shape
    [B, 1, ..., 1]) in x's dtype, divided by 1 - p when 1 - p > 0, then x * noise."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


def stochastic_depth_peer():
    try:
        import torchvision
        import torchvision.ops
        fn = torchvision.ops.stochastic_depth
        return ("torchvision.stochastic_depth", fn, dict(reimpl=False, torchvision=torchvision.__version__))
    except Exception as e:  # noqa: BLE001
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        return ("torchvision.stochastic_depth(reimpl)", sd_equiv, dict(reimpl=True, reimpl_reason=why))


def run(rep, quick):
    dtype_name = "bf16"
    dtype = torch.bfloat16
    side = 1024 if quick else 4096
    shape = (BATCH, side, side)
    n = BATCH * side * side
    row_bytes = side * side * 2
    kept = BATCH - len(DROPPED)
    base = dict(shape=f"{BATCH}x{side}x{side}", p=P, kept_samples=kept)

    x = torch.randn(shape, device="cuda", dtype=dtype)
    branch = torch.randn_like(x)
    dst = torch.empty_like(x)

    def emit(impl, kernel, fn, nbytes, copy, extra=None, kept_samples=None):
        ms = common.median_ms(fn, LAUNCHES, REPEATS, WARMUP)
        row = dict(base)
        if kept_samples is not None:
            row["kept_samples"] = kept_samples
        row.update(extra or {})
        rep.emit(impl, kernel, dtype_name, n, "burst", LAUNCHES, REPEATS, ms, nbytes,
                 copy if copy != "self" else (ms, nbytes), row)
        return ms

    copy = None
    try:
        data = 2 * n * 2
        copy = (emit("copy", "copy", lambda: dst.copy_(x), data, "self", kept_samples=BATCH), data)
    except Exception as e:  # noqa: BLE001
        skipped("copy", dtype_name, e)

    impl, sd, extra = stochastic_depth_peer()
    try:
        extra_f = dict(extra, call='residual + stochastic_depth(branch, p, "row", training=True)')
        emit(impl, "stochastic_depth_forward", lambda: x + sd(branch, P, "row", True), 3 * n * 2, copy, extra_f,
             kept_samples=BATCH)
    except Exception as e:  # noqa: BLE001
        skipped(impl, dtype_name, e)
    y = None
    try:
        bg = branch.detach().requires_grad_()
        y = x + sd(bg, P, "row", True)
        dy = torch.randn_like(x)
        extra_b = dict(extra, backward="torch.autograd.grad(y, branch, dy, retain_graph=True)")
        emit(impl, "stochastic_depth_backward",
             lambda: torch.autograd.grad(y, bg, dy, retain_graph=True), 2 * n * 2, copy, extra_b,
             kept_samples=BATCH)
        del dy, bg
    except Exception as e:  # noqa: BLE001
        skipped(impl, dtype_name, e)
    finally:
        del y

    impl = "torchtune.layer_dropout"
    try:
        keep = torch.ones(BATCH, dtype=torch.bool, device="cuda")
        keep[list(DROPPED)] = False

        def torchtune_style():
            ind = keep.nonzero().squeeze(1)
            xs = torch.index_select(x, 0, ind)
            out = x.clone()
            out[ind] = xs
            return out

        emit(impl, "sample_compaction", torchtune_style, 2 * kept * row_bytes + 2 * BATCH * row_bytes, copy,
             dict(call="index_select + clone + index_put, identity layer", fixed_flags=True))
    except Exception as e:  # noqa: BLE001
        skipped(impl, dtype_name, e)

    del x, branch, dst
    torch.cuda.empty_cache()


def main():
    global torch, common
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    args = ap.parse_args()
    try:
        import torch as _torch
    except Exception as e:  # noqa: BLE001
        skipped("all", "all", e)
        return 0
    torch = _torch
    if not torch.cuda.is_available():
        skipped("all", "all", "no CUDA device (torch.cuda.is_available() is False)")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dropout_torch as _common
    common = _common
    rep = common.Reporter()
    print(f"skip peers on {rep.meta['gpu']}: torch {torch.__version__}, p = {P}"
          f"{' (quick)' if args.quick else ''}", flush=True)
    torch.manual_seed(0)
    t0 = time.monotonic()
    try:
        run(rep, args.quick)
    except Exception as e:  # noqa: BLE001  (e.g. out of memory)
        skipped("skip", "bf16", e)
    print(f"skip peers: done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
