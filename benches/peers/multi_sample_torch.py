#!/usr/bin/env python3
"""Peer side of the multi-sample dropout benchmark: times the PyTorch loop (eager and torch.compile)
on the same GPU, with the method and JSON-lines schema of benches/peers/dropout_torch.py (CUDA events
around LAUNCHES back-to-back calls, REPEATS such windows after WARMUP calls, median per call; the
timing helpers and the reporter are imported from it).

Usage:
  python3 benches/peers/multi_sample_torch.py
  DROPFUSE_BENCH_JSON=results.jsonl DROPFUSE_COMMIT=$(git rev-parse --short HEAD) \\
      python3 benches/peers/multi_sample_torch.py

Cases (f16 and bf16; K = 8, B = 1024, D = 2048, C = 1000, p = 0.1, label smoothing 0.1, every label
valid, ignore_index -100):

  kernel                 what is timed (one call = forward + backward)
  weighted_ce_fwd_bwd    z (K x B x C, requires grad): loss = sum_k w_k * F.cross_entropy(z[k], y,
                         label_smoothing=0.1) with w_k = 1/K; torch.autograd.grad(loss, z). The
                         dropfuse row of the same name times the fused loss-averaging kernel.
  head_fwd_bwd           h (B x D), W (C x D), b (C), all requiring grad: the framework loop
                         loss = mean over k of F.cross_entropy(F.linear(F.dropout(h, p), W, b), y,
                         label_smoothing=0.1); torch.autograd.grad(loss, (h, W, b)).
  copy                   dst.copy_(src) of the K x B x C logits (the baseline of weighted_ce rows)

  impl: torch.eager, torch.compile (torch.compile(dynamic=False) of the same function, forward and
  backward compiled; compiled in the warm-up, before any timing).

Bytes counted: weighted_ce_fwd_bwd: read z + write dz + labels (as on the dropfuse side);
head_fwd_bwd: read h, W, b + write dh, dW, db (the GEMMs' FLOPs dominate; copy_fraction is null).

A peer that fails prints `PEER_SKIPPED impl=... dtype=... reason=...` and the script goes on;
without torch or a CUDA device it prints one PEER_SKIPPED line and exits with status 0.

Environment:
  DROPFUSE_BENCH_JSON       file to append JSON lines to
  DROPFUSE_COMMIT           commit recorded in the JSON rows (default "unknown")
  DROPFUSE_BENCH_COMPILE    0 skips the torch.compile peers (default 1)
"""
import os
import sys

K, B, D, C = 8, 1024, 2048, 1000
P = 0.1
EPS = 0.1
IGNORE = -100
LAUNCHES, REPEATS, WARMUP = 10, 20, 5


def skipped(impl, dtype, err):
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300] if isinstance(err, BaseException) \
        else " ".join(str(err).split())[:300]
    print(f"PEER_SKIPPED impl={impl} dtype={dtype} reason={reason}", flush=True)


def main():
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        skipped("all", "all", e)
        return 0
    if not torch.cuda.is_available():
        skipped("all", "all", "no CUDA device")
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dropout_torch as common

    rep = common.Reporter()
    compile_on = os.environ.get("DROPFUSE_BENCH_COMPILE", "1") != "0"

    def weighted_ce(z, y):
        # sum_k w_k * CE(z_k, y), w_k = 1 / K: the framework's loss averaging, K separate calls.
        return sum(F.cross_entropy(z[k], y, label_smoothing=EPS, ignore_index=IGNORE) for k in range(K)) / K

    def head(h, w, b, y):
        return sum(
            F.cross_entropy(F.linear(F.dropout(h, P, training=True), w, b), y, label_smoothing=EPS,
                            ignore_index=IGNORE)
            for _ in range(K)
        ) / K

    impls = [("torch.eager", lambda f: f)]
    if compile_on:
        impls.append(("torch.compile", lambda f: torch.compile(f, dynamic=False)))

    for dtype_name in ("f16", "bf16"):
        dtype = common.DTYPES[dtype_name]
        dev = torch.device("cuda")
        gen = torch.Generator(device=dev).manual_seed(5)
        y = torch.randint(0, C, (B,), device=dev, generator=gen)
        z = (torch.randn(K, B, C, device=dev, generator=gen) * 2).to(dtype).requires_grad_()
        dst = torch.empty_like(z)
        logits_bytes = z.numel() * z.element_size()
        zd = z.detach()
        copy_ms = common.median_ms(lambda: dst.copy_(zd), LAUNCHES, REPEATS, WARMUP)
        copy = (copy_ms, 2 * logits_bytes)
        rep.emit("copy", "copy", dtype_name, z.numel(), "burst", LAUNCHES, REPEATS, copy_ms, 2 * logits_bytes, copy,
                 extra=dict(shape=f"{K}x{B}x{C}"))

        h = (torch.randn(B, D, device=dev, generator=gen)).to(dtype).requires_grad_()
        w = (torch.randn(C, D, device=dev, generator=gen) * D ** -0.5).to(dtype).requires_grad_()
        b = torch.zeros(C, device=dev, dtype=dtype).requires_grad_()
        head_bytes = (h.numel() + w.numel() + b.numel()) * h.element_size() * 2

        for impl, wrap in impls:
            try:
                ce_fn = wrap(weighted_ce)

                def ce_call():
                    return torch.autograd.grad(ce_fn(z, y), z)

                ms = common.median_ms(ce_call, LAUNCHES, REPEATS, WARMUP)
                rep.emit(impl, "weighted_ce_fwd_bwd", dtype_name, z.numel(), "burst", LAUNCHES, REPEATS, ms,
                         2 * logits_bytes + 8 * B, copy,
                         extra=dict(shape=f"{K}x{B}x{C}", k=K, label_smoothing=EPS))
            except Exception as e:  # noqa: BLE001
                skipped(impl, dtype_name, e)
            try:
                head_fn = wrap(head)

                def head_call():
                    return torch.autograd.grad(head_fn(h, w, b, y), (h, w, b))

                ms = common.median_ms(head_call, LAUNCHES, REPEATS, WARMUP)
                rep.emit(impl, "head_fwd_bwd", dtype_name, K * B * D, "burst", LAUNCHES, REPEATS, ms, head_bytes, None,
                         extra=dict(shape=f"K{K}xB{B}xD{D}xC{C}", k=K, label_smoothing=EPS,
                                    gflop=round(3 * 2 * K * B * D * C / 1e9, 3)))
            except Exception as e:  # noqa: BLE001
                skipped(impl, dtype_name, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
