#!/usr/bin/env python3
"""Peer side of the token-routing benchmark (Mixture-of-Depths / GateSkip): times PyTorch eager
equivalents of benches/routing.rs on the same GPU, with the same method and JSON-lines schema as
benches/peers/dropout_torch.py (CUDA events around LAUNCHES back-to-back calls, REPEATS such windows
after WARMUP calls, median per call; the timing helpers and the reporter are imported from it).

Usage:
  python3 benches/peers/routing_torch.py [--quick]
  DROPFUSE_BENCH_JSON=results.jsonl DROPFUSE_COMMIT=$(git rev-parse --short HEAD) \\
      python3 benches/peers/routing_torch.py

  --quick   B = 2 instead of 16, for a smoke run

Shape: bf16 residual stream x of B x S x H = 16 x 4096 x 4096, f32 scores and gates of B x S,
k = S / 2 tokens per sequence (T = B * S / 2 selected), global keep fraction 0.5 ("n" in the rows is
the element count of x, as on the dropfuse side).

  impl           kernel                 what is timed (eager PyTorch)
  copy           copy                   y.copy_(x)
  torch.eager    routing_top_k_select   idx = scores.topk(k, dim=1).indices.sort(dim=1).values
                                        (the per-sequence ascending selected indices; the offsets
                                        are b * k, nothing to compute)
  torch.eager    routing_global_select  sel = scores.view(-1).topk(n).indices.sort().values;
                                        counts = bincount(sel // S, minlength=B); offsets =
                                        cumsum(counts) (the cu_seqlens dropfuse writes)
  torch.eager    routing_gather         compact = x.view(-1, H).index_select(0, flat)
  torch.eager    routing_scatter_add    x.view(-1, H).index_add_(0, flat, compact * g[:, None])
                                        with g = gate.view(-1).index_select(0, flat) in bf16
  torch.eager    routing_forward        top-k select + flat indices + gather + gated scatter-add,
                                        all of the above in one call

Bytes counted (the minimal traffic, identical to benches/routing.rs): select 4 B S + 4 T, gather
2 * 2 T H, scatter-add 3 * 2 T H + 4 T, forward the sum; copy 2 * 2 B S H. PyTorch's temporaries
(the scaled branch compact * g, the topk values) are not counted. copy_fraction is the row's
bandwidth over the copy's in the same run.

The peers are only timed here, not checked for correctness (eager topk does not promise dropfuse's
tie order, and bf16(g * branch) rounds once more than the fused kernel). A peer that fails prints
`PEER_SKIPPED impl=... dtype=... reason=...` and the script goes on; without torch or a CUDA device
it prints one PEER_SKIPPED line and exits with status 0.

Environment:
  DROPFUSE_BENCH_JSON       file to append JSON lines to
  DROPFUSE_COMMIT           commit recorded in the JSON rows (default "unknown")
"""
import argparse
import os
import sys
import time

B, S, H = 16, 4096, 4096
KEEP = 0.5
LAUNCHES, REPEATS, WARMUP = 10, 20, 5

torch = None
common = None


def skipped(impl, dtype, err):
    """Same line as dropout_torch.skipped, usable before torch (and dropout_torch) are imported."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300] if isinstance(err, BaseException) \
        else " ".join(str(err).split())[:300]
    print(f"PEER_SKIPPED impl={impl} dtype={dtype} reason={reason}", flush=True)


def run_all(rep, batch):
    dtype = torch.bfloat16
    n = batch * S * H
    k = S // 2
    total = batch * k
    n_global = int(round(KEEP * batch * S))
    select_bytes = 4 * batch * S + 4 * total
    gather_bytes = 2 * 2 * total * H
    scatter_bytes = 3 * 2 * total * H + 4 * total
    base = dict(shape=f"{batch}x{S}x{H}", k=k, keep_fraction=KEEP, selected=total, p=None)

    x = torch.randn(batch * S, H, device="cuda", dtype=dtype)
    y = torch.empty_like(x)
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(batch, S, device="cuda", dtype=torch.float32, generator=g)
    gate = torch.full((batch, S), 1.0 / 1024, device="cuda", dtype=torch.float32)
    seq_base = (torch.arange(batch, device="cuda") * S)[:, None]

    def select_top_k():
        return scores.topk(k, dim=1).indices.sort(dim=1).values

    def select_global():
        sel = scores.view(-1).topk(n_global).indices.sort().values
        counts = torch.bincount(sel // S, minlength=batch)
        offsets = torch.cumsum(counts, 0)
        return sel, offsets

    flat = (select_top_k() + seq_base).reshape(-1)
    compact = x.index_select(0, flat)
    gflat = gate.view(-1).index_select(0, flat)

    def gather():
        return x.index_select(0, flat)

    def scatter_add():
        return x.index_add_(0, flat, compact * gflat.to(dtype)[:, None])

    def forward():
        f = (select_top_k() + seq_base).reshape(-1)
        c = x.index_select(0, f)
        gg = gate.view(-1).index_select(0, f)
        x.index_add_(0, f, c * gg.to(dtype)[:, None])

    copy = None
    try:
        ms = common.median_ms(lambda: y.copy_(x), LAUNCHES, REPEATS, WARMUP)
        copy = (ms, 2 * 2 * n)
        rep.emit("copy", "copy", "bf16", n, "burst", LAUNCHES, REPEATS, ms, 2 * 2 * n, copy, dict(base))
    except Exception as e:  # noqa: BLE001
        skipped("copy", "bf16", e)

    for kernel, fn, nbytes in (
        ("routing_top_k_select", select_top_k, select_bytes),
        ("routing_global_select", select_global, select_bytes),
        ("routing_gather", gather, gather_bytes),
        ("routing_scatter_add", scatter_add, scatter_bytes),
        ("routing_forward", forward, select_bytes + gather_bytes + scatter_bytes),
    ):
        try:
            ms = common.median_ms(fn, LAUNCHES, REPEATS, WARMUP)
            rep.emit("torch.eager", kernel, "bf16", n, "burst", LAUNCHES, REPEATS, ms, nbytes, copy, dict(base))
        except Exception as e:  # noqa: BLE001
            skipped(f"torch.eager:{kernel}", "bf16", e)
    del x, y, compact
    torch.cuda.empty_cache()


def main():
    global torch, common
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="B = 2, for a smoke run")
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
    batch = 2 if args.quick else B
    print(f"routing peers on {rep.meta['gpu']}: torch {torch.__version__}, bf16 {batch} x {S} x {H}, "
          f"k = {S // 2}, keep fraction {KEEP}", flush=True)
    t0 = time.monotonic()
    try:
        run_all(rep, batch)
    except Exception as e:  # noqa: BLE001  (e.g. out of memory)
        skipped("all", "bf16", e)
    print(f"routing peers: done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
