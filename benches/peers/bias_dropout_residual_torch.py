#!/usr/bin/env python3
"""Peer side of the fused bias + dropout + residual benchmark: times PyTorch eager and torch.compile
of `r + F.dropout(x + b, p, training=True)` on the same GPU, with the same method and JSON-lines
schema as benches/peers/dropout_torch.py (CUDA events around LAUNCHES back-to-back calls, REPEATS
such windows after WARMUP calls, median per call; the timing helpers and the reporter are imported
from it), and the same kernel names, n and shape as benches/bias_dropout_residual.rs.

Usage:
  python3 benches/peers/bias_dropout_residual_torch.py [--quick]
  DROPFUSE_BENCH_JSON=results.jsonl DROPFUSE_COMMIT=$(git rev-parse --short HEAD) \\
      python3 benches/peers/bias_dropout_residual_torch.py

  --quick   1024 x 4096 instead of 65536 x 4096, for a smoke run

Shape 16 x 4096 x 4096 viewed as rows = 65536, H = 4096; bias of H elements; p = 0.1; bf16, f16, f32.
Method "burst": 10 launches per window, 20 windows, 5 warm-up calls (torch.compile compiles in the
warm-up, before any timing).

  impl                                 kernel (bias_dropout_residual_ + ...)  what is timed
  copy                                 copy               dst.copy_(x) (the baseline)
  torch.eager.bias_dropout_residual    forward_mask       f(x, b, r) with x, b requiring grad: autograd
  torch.compile.bias_dropout_residual  forward_mask       records the graph and the peer keeps its mask
                                                          (eager: native_dropout's bool mask; compile:
                                                          whatever the compiled training graph saves)
  torch.eager.bias_dropout_residual    forward_maskless   f(x, b, r) under torch.no_grad()
  torch.compile.bias_dropout_residual  forward_maskless   the same, compiled (an inference graph: one
                                                          fused kernel, no mask)
  torch.eager.bias_dropout_residual    backward_mask      torch.autograd.grad(y, (x, b), dy,
  torch.compile.bias_dropout_residual  backward_mask      retain_graph=True): dx and dbias from the
                                                          saved mask (the compiled backward for compile)

with f(x, b, r) = r + F.dropout(x + b, p, training=True) and torch.compile(f, dynamic=False).

Bytes counted (the same formulas as the Rust side, so the rows compare; kernel names carry the
prefix bias_dropout_residual_): forward_mask
3*n*s + H*s + ceil(n/32)*4 (the bit mask dropfuse writes; the peers' own masks are larger and not
counted), forward_maskless 3*n*s + H*s, backward_mask 2*n*s + ceil(n/32)*4 + H*s (without dropfuse's
dbias workspace), copy 2*n*s. copy_fraction is the row's bandwidth over the copy's of the same dtype
and n in the same run. Reference points quoted in the issue (H200, PyTorch 2.11, bf16):
torch.compile 1.023 ms, eager 1.468 ms.

A peer that fails prints `PEER_SKIPPED impl=... dtype=... reason=...` and the script goes on; without
torch or a CUDA device it prints one PEER_SKIPPED line and exits with status 0. The peers are only
timed here, not checked for correctness.

Environment:
  DROPFUSE_BENCH_JSON       file to append JSON lines to
  DROPFUSE_COMMIT           commit recorded in the JSON rows (default "unknown")
  DROPFUSE_BENCH_COMPILE    0 skips the torch.compile peers (default 1)
"""
import argparse
import math
import os
import sys
import time

P = 0.1
H = 4096
ROWS, QUICK_ROWS = 65536, 1024
LAUNCHES, REPEATS, WARMUP = 10, 20, 5
DTYPES = ("bf16", "f16", "f32")

torch = None
F = None
common = None


def skipped(impl, dtype, err):
    """Same line as dropout_torch.skipped, usable before torch (and dropout_torch) are imported."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300] if isinstance(err, BaseException) \
        else " ".join(str(err).split())[:300]
    print(f"PEER_SKIPPED impl={impl} dtype={dtype} reason={reason}", flush=True)


def bias_dropout_residual(x, b, r):
    return r + F.dropout(x + b, P, training=True)


def run_dtype(rep, dtype_name, rows, with_compile):
    dtype = common.DTYPES[dtype_name]
    n = rows * H
    s = torch.tensor([], dtype=dtype).element_size()
    mask_bytes = 4 * math.ceil(n / 32)
    fwd_mask = 3 * n * s + H * s + mask_bytes
    fwd_maskless = 3 * n * s + H * s
    bwd_mask = 2 * n * s + mask_bytes + H * s
    copy_bytes = 2 * n * s
    base = dict(shape=f"{rows}x{H}", bias=True)

    x = torch.randn((rows, H), device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    b = torch.randn((H,), device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    dst = torch.empty_like(x)

    def run(impl, kernel, fn, nbytes, copy, extra=None):
        ms = common.median_ms(fn, LAUNCHES, REPEATS, WARMUP)
        row_extra = dict(base)
        row_extra.update(extra or {})
        rep.emit(impl, kernel, dtype_name, n, "burst", LAUNCHES, REPEATS, ms, nbytes,
                 copy if copy != "self" else (ms, nbytes), row_extra)

    copy = None
    try:
        ms = common.median_ms(lambda: dst.copy_(x), LAUNCHES, REPEATS, WARMUP)
        rep.emit("copy", "copy", dtype_name, n, "burst", LAUNCHES, REPEATS, ms, copy_bytes,
                 (ms, copy_bytes), dict(base))
        copy = (ms, copy_bytes)
    except Exception as e:  # noqa: BLE001
        skipped("copy", dtype_name, e)

    peers = [("torch.eager.bias_dropout_residual", bias_dropout_residual, {})]
    if with_compile:
        try:
            peers.append(("torch.compile.bias_dropout_residual",
                          torch.compile(bias_dropout_residual, dynamic=False), dict(compiled="f")))
        except Exception as e:  # noqa: BLE001
            skipped("torch.compile.bias_dropout_residual", dtype_name, e)
    else:
        skipped("torch.compile.bias_dropout_residual", dtype_name, "DROPFUSE_BENCH_COMPILE=0")

    xg = x.detach().requires_grad_()
    bg = b.detach().requires_grad_()
    for impl, fn, extra in peers:
        try:
            run(impl, "bias_dropout_residual_forward_mask", lambda fn=fn: fn(xg, bg, r), fwd_mask, copy,
                dict(extra, mode="autograd recording (mask saved)"))
        except Exception as e:  # noqa: BLE001
            skipped(impl, dtype_name, e)
        try:
            def maskless(fn=fn):
                with torch.no_grad():
                    return fn(x, b, r)
            run(impl, "bias_dropout_residual_forward_maskless", maskless, fwd_maskless, copy, dict(extra, mode="torch.no_grad()"))
        except Exception as e:  # noqa: BLE001
            skipped(impl, dtype_name, e)
        y = None
        try:
            y = fn(xg, bg, r)
            run(impl, "bias_dropout_residual_backward_mask",
                lambda y=y: torch.autograd.grad(y, (xg, bg), dy, retain_graph=True), bwd_mask, copy,
                dict(extra, backward="torch.autograd.grad(y, (x, b), dy, retain_graph=True)"))
        except Exception as e:  # noqa: BLE001
            skipped(impl, dtype_name, e)
        finally:
            del y
    del x, r, b, dy, dst, xg, bg
    torch.cuda.empty_cache()


def main():
    global torch, F, common
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024 x 4096, for a smoke run")
    args = ap.parse_args()
    try:
        import torch as _torch
        import torch.nn.functional as _F
    except Exception as e:  # noqa: BLE001
        skipped("all", "all", e)
        return 0
    torch, F = _torch, _F
    if not torch.cuda.is_available():
        skipped("all", "all", "no CUDA device (torch.cuda.is_available() is False)")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dropout_torch as _common
    common = _common

    rep = common.Reporter()
    with_compile = os.environ.get("DROPFUSE_BENCH_COMPILE", "1").strip() != "0"
    rows = QUICK_ROWS if args.quick else ROWS
    print(f"bias_dropout_residual peers on {rep.meta['gpu']}: torch {torch.__version__}, {rows} x {H}, "
          f"p = {P}", flush=True)
    torch.manual_seed(0)
    t0 = time.monotonic()
    for dtype_name in DTYPES:
        try:
            run_dtype(rep, dtype_name, rows, with_compile)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory)
            skipped("all", dtype_name, e)
            torch.cuda.empty_cache()
    print(f"bias_dropout_residual peers: done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
