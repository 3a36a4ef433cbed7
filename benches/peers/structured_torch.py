#!/usr/bin/env python3
"""Peer side of the structured and Monte-Carlo dropout benchmarks (benches/structured.rs): times the
PyTorch ways of doing the same work on the same GPU, with the method and JSON-lines schema of
benches/peers/dropout_torch.py (CUDA events around LAUNCHES back-to-back calls, REPEATS windows after
WARMUP calls, median per call; the timing helpers and the reporter are imported from it).

Usage:
  python3 benches/peers/structured_torch.py [--quick]
  DROPFUSE_BENCH_JSON=results.jsonl DROPFUSE_COMMIT=$(git rev-parse --short HEAD) \\
      python3 benches/peers/structured_torch.py

  --quick   smaller shapes for a smoke run

Cases (p = 0.1; "n" in the rows is the element count the kernel name implies, as in structured.rs):

  kernel                          shape                 impl: what is timed
  channel_2d_forward_maskless     64x256x56x56 f16      torch.dropout2d: F.dropout2d(x, p, training=True)
                                                        torch.compile.dropout2d: torch.compile of the same
  channel_2d_backward             64x256x56x56 f16      torch.mask_mul: torch.mul(dy, keep_scaled, out=dx),
                                                        keep_scaled (N, C, 1, 1) broadcast (AWD-style backward)
  locked_forward_maskless         512x64x1024 f16       awd_lstm.locked_dropout: m = x.new_empty(1, B, H)
                                                        .bernoulli_(1 - p) / (1 - p); x * m.expand_as(x)
                                                        torch.compile.locked_dropout: torch.compile of it
  embedding_rows_forward_maskless 50257x1024 f16        awd_lstm.embedded_dropout: m = w.new_empty(V, 1)
                                                        .bernoulli_(1 - p).expand_as(w) / (1 - p); m * w
                                                        torch.compile.embedded_dropout
  mc_replicas_forward_maskless    16x256x4096 f16       torch.dropout_loop: for t in range(R):
                                                        torch.nn.functional.dropout(x, p) written into out[t]
                                                        (out=... via copy_), the usual MC-dropout loop;
                                                        torch.dropout_expand: F.dropout(x.expand(R, B, F)) (one call)
  mc_summaries                    16x1024x1000 f32      torch.mc_summaries: mean, population var over T,
                                                        predictive entropy -sum xlogy(mean, mean), expected
                                                        entropy mean_t(-sum xlogy(p, p)), BALD clamp_min(0)
                                                        torch.compile.mc_summaries

Bytes counted as in benches/structured.rs (nominal: read x + write y; replicas: read x + write R*n;
summaries: the stack read once, 16*B*C for the state and 12*B*C for the finish, although torch moves
more). The peers' masks are not counted. copy_fraction is over a copy of the case's data in the same
run. A peer that fails prints `PEER_SKIPPED impl=... dtype=... reason=...` and the script goes on;
without torch or a CUDA device it prints one PEER_SKIPPED line and exits with status 0.

Environment:
  DROPFUSE_BENCH_JSON       file to append JSON lines to
  DROPFUSE_COMMIT           commit recorded in the JSON rows (default "unknown")
  DROPFUSE_BENCH_COMPILE    0 skips the torch.compile peers (default 1)
"""
import argparse
import os
import sys
import time

P = 0.1
LAUNCHES, REPEATS, WARMUP = 10, 10, 3

torch = None
F = None
common = None


def skipped(impl, dtype, err):
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300] if isinstance(err, BaseException) \
        else " ".join(str(err).split())[:300]
    print(f"PEER_SKIPPED impl={impl} dtype={dtype} reason={reason}", flush=True)


def label(shape):
    return "x".join(str(s) for s in shape)


# ---------------------------------------------------------------------------------------------
# The peers


def dropout2d(x):
    return F.dropout2d(x, P, training=True)


def locked_dropout(x):
    """AWD-LSTM's LockedDropout on (T, B, H): one (1, B, H) mask for every time step."""
    m = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - P) / (1 - P)
    return x * m.expand_as(x)


def embedded_dropout(w):
    """AWD-LSTM's embedded_dropout on the weight [V, E]: one decision per row."""
    m = w.new_empty((w.size(0), 1)).bernoulli_(1 - P).expand_as(w) / (1 - P)
    return m * w


def mc_summaries(probs):
    """Mean, population variance, predictive entropy, expected entropy and BALD of a T x B x C stack."""
    mean = probs.mean(0)
    var = probs.var(0, unbiased=False)
    pred = -torch.special.xlogy(mean, mean).sum(-1)
    expected = (-torch.special.xlogy(probs, probs).sum(-1)).mean(0)
    bald = (pred - expected).clamp_min(0)
    return mean, var, pred, expected, bald


class Case:
    def __init__(self, rep, dtype_name, data_elems):
        self.rep = rep
        self.dtype_name = dtype_name
        self.dtype = common.DTYPES[dtype_name]
        src = torch.empty(data_elems, device="cuda", dtype=self.dtype)
        dst = torch.empty_like(src)
        self.copy_bytes = 2 * data_elems * src.element_size()
        self.copy = None
        try:
            ms = common.median_ms(lambda: dst.copy_(src), LAUNCHES, REPEATS, WARMUP)
            self.copy = (ms, self.copy_bytes)
            self.emit("copy", "copy", data_elems, ms, self.copy_bytes, {}, copy=(ms, self.copy_bytes))
        except Exception as e:  # noqa: BLE001
            skipped("copy", dtype_name, e)
        del src, dst

    def emit(self, impl, kernel, n, ms, nbytes, extra, copy=None):
        self.rep.emit(impl, kernel, self.dtype_name, n, "burst", LAUNCHES, REPEATS, ms, nbytes,
                      copy if copy is not None else self.copy, extra)

    def run(self, impl, kernel, n, fn, nbytes, extra):
        try:
            ms = common.median_ms(fn, LAUNCHES, REPEATS, WARMUP)
            self.emit(impl, kernel, n, ms, nbytes, extra)
        except Exception as e:  # noqa: BLE001
            skipped(impl, self.dtype_name, e)


def compiled(fn, with_compile):
    if not with_compile:
        raise RuntimeError("DROPFUSE_BENCH_COMPILE=0")
    return torch.compile(fn, dynamic=False)


def run_channel(rep, shape, with_compile):
    n = 1
    for s in shape:
        n *= s
    case = Case(rep, "f16", n)
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    extra = dict(shape=label(shape))
    data = 2 * n * 2
    case.run("torch.dropout2d", "channel_2d_forward_maskless", n, lambda: dropout2d(x), data, extra)
    try:
        fn = compiled(dropout2d, with_compile)
        case.run("torch.compile.dropout2d", "channel_2d_forward_maskless", n, lambda: fn(x), data, extra)
    except Exception as e:  # noqa: BLE001
        skipped("torch.compile.dropout2d", "f16", e)
    keep = (torch.rand(shape[0], shape[1], 1, 1, device="cuda") >= P).to(torch.float16) / (1 - P)
    dy = torch.randn_like(x)
    dx = torch.empty_like(x)
    case.run("torch.mask_mul", "channel_2d_backward", n, lambda: torch.mul(dy, keep, out=dx), data,
             dict(extra, backward="torch.mul(dy, keep_scaled[N,C,1,1], out=dx)"))
    del x, dy, dx, keep
    torch.cuda.empty_cache()


def run_locked(rep, shape, with_compile):
    n = shape[0] * shape[1] * shape[2]
    case = Case(rep, "f16", n)
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    extra = dict(shape=label(shape), locked_axis=0)
    data = 2 * n * 2
    case.run("awd_lstm.locked_dropout", "locked_forward_maskless", n, lambda: locked_dropout(x), data, extra)
    try:
        fn = compiled(locked_dropout, with_compile)
        case.run("torch.compile.locked_dropout", "locked_forward_maskless", n, lambda: fn(x), data, extra)
    except Exception as e:  # noqa: BLE001
        skipped("torch.compile.locked_dropout", "f16", e)
    del x
    torch.cuda.empty_cache()


def run_embedding(rep, shape, with_compile):
    n = shape[0] * shape[1]
    case = Case(rep, "f16", n)
    w = torch.randn(shape, device="cuda", dtype=torch.float16)
    extra = dict(shape=label(shape))
    data = 2 * n * 2
    case.run("awd_lstm.embedded_dropout", "embedding_rows_forward_maskless", n, lambda: embedded_dropout(w),
             data, extra)
    try:
        fn = compiled(embedded_dropout, with_compile)
        case.run("torch.compile.embedded_dropout", "embedding_rows_forward_maskless", n, lambda: fn(w), data,
                 extra)
    except Exception as e:  # noqa: BLE001
        skipped("torch.compile.embedded_dropout", "f16", e)
    del w
    torch.cuda.empty_cache()


def run_mc_replicas(rep, replicas, batch, features):
    n = batch * features
    case = Case(rep, "f16", replicas * n)
    x = torch.randn(batch, features, device="cuda", dtype=torch.float16)
    out = torch.empty(replicas, batch, features, device="cuda", dtype=torch.float16)
    extra = dict(shape=f"{replicas}x{batch}x{features}", replicas=replicas)
    nbytes = (n + replicas * n) * 2

    def loop():
        for t in range(replicas):
            out[t].copy_(F.dropout(x, P, training=True))

    case.run("torch.dropout_loop", "mc_replicas_forward_maskless", replicas * n, loop, nbytes,
             dict(extra, what="for t in range(R): out[t].copy_(F.dropout(x, p))"))
    case.run("torch.dropout_expand", "mc_replicas_forward_maskless", replicas * n,
             lambda: F.dropout(x.expand(replicas, batch, features), P, training=True), nbytes,
             dict(extra, what="F.dropout(x.expand(R, B, F), p)"))
    del x, out
    torch.cuda.empty_cache()


def run_mc_summaries(rep, samples, batch, classes, with_compile):
    per = batch * classes
    case = Case(rep, "f32", samples * per)
    probs = torch.softmax(torch.randn(samples, batch, classes, device="cuda"), dim=-1)
    extra = dict(shape=f"{samples}x{batch}x{classes}")
    nbytes = 4 * samples * per + 16 * per + 12 * per
    case.run("torch.mc_summaries", "mc_summaries", samples * per, lambda: mc_summaries(probs), nbytes, extra)
    try:
        fn = compiled(mc_summaries, with_compile)
        case.run("torch.compile.mc_summaries", "mc_summaries", samples * per, lambda: fn(probs), nbytes, extra)
    except Exception as e:  # noqa: BLE001
        skipped("torch.compile.mc_summaries", "f32", e)
    del probs
    torch.cuda.empty_cache()


def main():
    global torch, F, common
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
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
    print(f"structured peers on {rep.meta['gpu']}: torch {torch.__version__}, p = {P}"
          f"{' (quick)' if args.quick else ''}", flush=True)
    torch.manual_seed(0)
    t0 = time.monotonic()
    q = args.quick
    steps = [
        ("channel_2d", lambda: run_channel(rep, (8, 64, 56, 56) if q else (64, 256, 56, 56), with_compile)),
        ("locked", lambda: run_locked(rep, (64, 16, 1024) if q else (512, 64, 1024), with_compile)),
        ("embedding_rows", lambda: run_embedding(rep, (5000, 1024) if q else (50257, 1024), with_compile)),
        ("mc_replicas", lambda: run_mc_replicas(rep, 16, 32 if q else 256, 4096)),
        ("mc_summaries", lambda: run_mc_summaries(rep, 16, 128 if q else 1024, 1000, with_compile)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001  (e.g. out of memory)
            skipped(name, "all", e)
            torch.cuda.empty_cache()
    print(f"structured peers: done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
