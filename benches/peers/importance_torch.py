#!/usr/bin/env python3
"""Peer side of the attention-importance benchmark: times PyTorch's per-token cosine similarity
between a layer's input and output hidden states on the same GPU, with the same method and
JSON-lines schema as benches/peers/dropout_torch.py (CUDA events around LAUNCHES back-to-back calls,
REPEATS such windows after WARMUP calls, median per call; the timing helpers and the reporter are
imported from it), and the same kernel names, n and shape as benches/importance.rs.

Usage:
  python3 benches/peers/importance_torch.py [--quick]
  DROPFUSE_BENCH_JSON=results.jsonl DROPFUSE_COMMIT=$(git rev-parse --short HEAD) \\
      python3 benches/peers/importance_torch.py

  --quick   1024 tokens instead of 65536, for a smoke run

Hidden states 16 x 4096 x 4096 (tokens = 65536, H = 4096); bf16, f16, f32. Method "burst": 10
launches per window, 20 windows, 5 warm-up calls (torch.compile compiles in the warm-up).

  impl                               kernel      what is timed
  copy                               copy        dst.copy_(x) (the baseline)
  torch.cosine_similarity.fp32       importance  F.cosine_similarity(x.float(), y.float(), dim=-1).mean()
                                                 (the issue's peer: fp32 upcast, then the op)
  torch.cosine_similarity            importance  F.cosine_similarity(x, y, dim=-1).float().mean() in the
                                                 input dtype (no upcast; less accurate for f16/bf16)
  torch.compile.cosine_similarity    importance  torch.compile(dynamic=False) of the fp32 peer

Every peer returns the batch mean as a 0-d tensor on the GPU (no host synchronisation per call, like
dropfuse's accumulator). Bytes counted: 2*n*s (reading x and y once), whatever the peer moves; copy
2*n*s. copy_fraction is the row's bandwidth over the copy's of the same dtype in the same run.
Reference point quoted in the issue (H200, PyTorch 2.11, bf16): cosine importance 4.694 ms.

A peer that fails prints `PEER_SKIPPED impl=... dtype=... reason=...` and the script goes on; without
torch or a CUDA device it prints one PEER_SKIPPED line and exits with status 0.

Environment:
  DROPFUSE_BENCH_JSON       file to append JSON lines to
  DROPFUSE_COMMIT           commit recorded in the JSON rows (default "unknown")
  DROPFUSE_BENCH_COMPILE    0 skips the torch.compile peer (default 1)
"""
import argparse
import os
import sys
import time

H = 4096
TOKENS, QUICK_TOKENS = 65536, 1024
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


def cosine_fp32(x, y):
    return F.cosine_similarity(x.float(), y.float(), dim=-1).mean()


def cosine_native(x, y):
    return F.cosine_similarity(x, y, dim=-1).float().mean()


def run_dtype(rep, dtype_name, tokens, with_compile):
    dtype = common.DTYPES[dtype_name]
    n = tokens * H
    s = torch.tensor([], dtype=dtype).element_size()
    nbytes = 2 * n * s
    base = dict(shape=f"{tokens}x{H}")
    x = torch.randn((tokens, H), device="cuda", dtype=dtype)
    y = x + 0.1 * torch.randn_like(x)
    dst = torch.empty_like(x)

    copy = None
    try:
        ms = common.median_ms(lambda: dst.copy_(x), LAUNCHES, REPEATS, WARMUP)
        rep.emit("copy", "copy", dtype_name, n, "burst", LAUNCHES, REPEATS, ms, nbytes, (ms, nbytes), dict(base))
        copy = (ms, nbytes)
    except Exception as e:  # noqa: BLE001
        skipped("copy", dtype_name, e)

    peers = [("torch.cosine_similarity.fp32", cosine_fp32, dict(peer="F.cosine_similarity(x.float(), "
                                                                 "y.float(), dim=-1).mean()")),
             ("torch.cosine_similarity", cosine_native, dict(peer="F.cosine_similarity(x, y, dim=-1)"
                                                              ".float().mean()"))]
    if with_compile:
        try:
            peers.append(("torch.compile.cosine_similarity", torch.compile(cosine_fp32, dynamic=False),
                          dict(peer="torch.compile of the fp32 peer")))
        except Exception as e:  # noqa: BLE001
            skipped("torch.compile.cosine_similarity", dtype_name, e)
    else:
        skipped("torch.compile.cosine_similarity", dtype_name, "DROPFUSE_BENCH_COMPILE=0")

    with torch.no_grad():
        for impl, fn, extra in peers:
            try:
                ms = common.median_ms(lambda fn=fn: fn(x, y), LAUNCHES, REPEATS, WARMUP)
                row = dict(base)
                row.update(extra)
                rep.emit(impl, "importance", dtype_name, n, "burst", LAUNCHES, REPEATS, ms, nbytes, copy, row)
            except Exception as e:  # noqa: BLE001
                skipped(impl, dtype_name, e)
    del x, y, dst
    torch.cuda.empty_cache()


def main():
    global torch, F, common
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024 tokens, for a smoke run")
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
    tokens = QUICK_TOKENS if args.quick else TOKENS
    print(f"importance peers on {rep.meta['gpu']}: torch {torch.__version__}, {tokens} x {H}", flush=True)
    torch.manual_seed(0)
    t0 = time.monotonic()
    for dtype_name in DTYPES:
        try:
            run_dtype(rep, dtype_name, tokens, with_compile)
        except Exception as e:  # noqa: BLE001
            skipped("all", dtype_name, e)
            torch.cuda.empty_cache()
    print(f"importance peers: done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
