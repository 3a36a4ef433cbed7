#!/usr/bin/env python3
"""Peer side of the DropBlock benchmark: times PyTorch DropBlock implementations (timm, torchvision,
torch.compile) on the same GPU, with the same method and JSON-lines schema as
benches/peers/dropout_torch.py (CUDA events around LAUNCHES back-to-back calls, REPEATS such windows
after WARMUP calls, median per call; the timing helpers and the reporter are imported from it).

Usage:
  python3 benches/peers/drop_block_torch.py [--quick]
  DROPFUSE_BENCH_JSON=results.jsonl DROPFUSE_COMMIT=$(git rev-parse --short HEAD) \\
      python3 benches/peers/drop_block_torch.py

  --quick   smaller shapes (8x64x56x56 and 2x16x16x56x56) for a smoke run

Cases (method "burst", 10 launches per window, 10 windows, 3 warm-up calls; torch.compile compiles in
the warm-up, before any timing; "n" in the rows is the element count of x):

  kernel                  dtype  shape (N,C,[D,]H,W)  block_size  p    gamma_scale
  drop_block_2d_forward   f16    64x256x56x56         7           0.1  1.0 (timm only)
  drop_block_2d_backward  f16    64x256x56x56         7           0.1  1.0 (timm only)
  drop_block_3d_forward   f16    8x64x16x56x56        5           0.1  -

  impl                          kernels            what is timed
  copy                          copy               dst.copy_(x), one per shape (the baseline)
  timm.drop_block_2d            2d fwd, 2d bwd     timm's drop_block_2d(x, drop_prob=p, block_size=bs),
                                                   every other argument at timm's default
  timm.drop_block_fast_2d       2d fwd             timm's drop_block_fast_2d(x, drop_prob=p, block_size=bs)
  torchvision.drop_block2d      2d fwd, 2d bwd     torchvision.ops.drop_block2d(x, p, bs, inplace=False,
                                                   eps=1e-6, training=True)
  torchvision.drop_block3d      3d fwd             torchvision.ops.drop_block3d(x, p, bs, ...), same args
  torch.compile.drop_block_2d   2d fwd             torch.compile(dynamic=False) of the torchvision-style
                                                   re-implementation below (tv_drop_block_equiv)
  torch.mask_mul                2d bwd             torch.mul(dy, keep_scaled, out=dx): the backward as an
                                                   explicit multiply by a stored, pre-scaled keep mask of
                                                   x's dtype (one elementwise kernel; the cheapest
                                                   backward a mask-storing PyTorch peer can do)

timm's defaults: the long-standing drop_block_2d(x, drop_prob, block_size, gamma_scale=1.0,
with_noise=False, inplace=False, batchwise=False) has no couple_channels argument and draws one mask
per (sample, channel) plane; a later refactor adds couple_channels=False and partial_edge_blocks=False
(same per-plane masks by default). Whatever the installed timm's signature is, peer_args records it.
drop_block_fast_2d gets no backward row (some timm versions do not return its result).

What the backward rows of timm / torchvision time: y = peer(x) is built once with x.requires_grad_();
each timed call is torch.autograd.grad(y, x, dy, retain_graph=True), i.e. exactly the kernels
autograd runs for the peer's `x * mask * scale` (two elementwise multiplies by the saved mask and
scale; autograd.grad rather than y.backward so that x.grad is not accumulated across calls).

Bytes counted in every row: read x + write y (forward), read dy + write dx (backward), copy: read x +
write dst. The peers' masks (full-width tensors of x's dtype, plus their random noise and pooling
intermediates) are not counted, like the bit masks on the dropfuse side; copy_fraction is the row's
bandwidth over the copy's of the same dtype and shape in the same run.

Fallbacks: when timm (timm.layers.drop, or timm.models.layers.drop in older timm) or
torchvision.ops.drop_block2d/3d cannot be imported, the rows time this script's re-implementations
of those algorithms (timm_drop_block_2d_equiv, timm_drop_block_fast_2d_equiv, tv_drop_block_equiv)
instead, and the impl names carry a "(reimpl)" suffix, e.g. "timm.drop_block_2d(reimpl)"; the JSON
rows also say reimpl=true. The library versions (timm, torchvision) and, for timm, the keyword
arguments its signature gives (peer_args) are recorded in the JSON rows. A peer that fails prints
`PEER_SKIPPED impl=... dtype=... reason=...` and the script goes on; without torch or a CUDA device
it prints one PEER_SKIPPED line and exits with status 0.

The peers are only timed here, not checked for correctness. (Note: torchvision normalises with
mask.sum() in x's dtype, which overflows f16 above 65504 kept elements; that changes the values it
produces at these shapes, not the kernels it runs.)

Environment:
  DROPFUSE_BENCH_JSON       file to append JSON lines to
  DROPFUSE_COMMIT           commit recorded in the JSON rows (default "unknown")
  DROPFUSE_BENCH_COMPILE    0 skips the torch.compile peer (default 1)
"""
import argparse
import importlib
import inspect
import math
import os
import sys
import time

P = 0.1
GAMMA_SCALE = 1.0
# Burst method: modest constants so that the whole script stays well under a minute on an H200.
LAUNCHES, REPEATS, WARMUP = 10, 10, 3

# (kernel prefix, dtype name, full shape, quick shape, block size)
CASES_2D = ("drop_block_2d", "f16", (64, 256, 56, 56), (8, 64, 56, 56), 7)
CASES_3D = ("drop_block_3d", "f16", (8, 64, 16, 56, 56), (2, 16, 16, 56, 56), 5)

torch = None
F = None
common = None


def skipped(impl, dtype, err):
    """Same line as dropout_torch.skipped, usable before torch (and dropout_torch) are imported."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300] if isinstance(err, BaseException) \
        else " ".join(str(err).split())[:300]
    print(f"PEER_SKIPPED impl={impl} dtype={dtype} reason={reason}", flush=True)


# ---------------------------------------------------------------------------------------------
# Re-implementations (used only when the library cannot be imported, and as the torch.compile input)


def _timm_gamma(drop_prob, block_size, gamma_scale, h, w):
    """timm's seed rate. Note timm's quirk: the valid-region term uses the unclipped block size."""
    b = min(block_size, h, w)
    return gamma_scale * drop_prob * (h * w) / (b * b) / ((w - block_size + 1) * (h - block_size + 1))


def timm_drop_block_2d_equiv(x, drop_prob=0.1, block_size=7, gamma_scale=1.0):
    """Re-implementation of timm's drop_block_2d algorithm (with_noise=False, inplace=False,
    batchwise=False: one independent mask per (sample, channel) plane), written from its description:

    1. b = min(block_size, H, W); gamma as in _timm_gamma.
    2. Uniform noise u of x's shape and dtype; a seed may only sit at positions where a b x b block
       centred on it lies inside the map (the "valid region" mask v, 1 inside, 0 outside).
    3. keep_seed = (2 - gamma - v + u >= 1), i.e. 0 exactly at valid positions with u < gamma.
    4. The keep mask is keep_seed eroded by a b x b window: -max_pool2d(-keep_seed, b, stride 1,
       padding b // 2), which zeroes the b x b block around every seed.
    5. y = x * keep * scale with scale = numel / (sum(keep) in f32 + 1e-7), cast to x's dtype.

    (timm builds v with torch.meshgrid, which is only right for H == W; this version broadcasts rows
    against columns, which is the same for the square maps benchmarked here.)
    """
    _, _, h, w = x.shape
    b = min(block_size, h, w)
    gamma = _timm_gamma(drop_prob, block_size, gamma_scale, h, w)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    row_ok = (rows >= b // 2) & (rows < h - (b - 1) // 2)
    col_ok = (cols >= b // 2) & (cols < w - (b - 1) // 2)
    valid = (row_ok[:, None] & col_ok[None, :]).to(x.dtype).reshape(1, 1, h, w)
    noise = torch.rand_like(x)
    keep_seed = ((2 - gamma - valid + noise) >= 1).to(x.dtype)
    keep = -F.max_pool2d(-keep_seed, kernel_size=b, stride=1, padding=b // 2)
    scale = (keep.numel() / keep.to(torch.float32).sum().add(1e-7)).to(x.dtype)
    return x * keep * scale


def timm_drop_block_fast_2d_equiv(x, drop_prob=0.1, block_size=7, gamma_scale=1.0):
    """Re-implementation of timm's drop_block_fast_2d algorithm (with_noise=False, inplace=False):
    Bernoulli(gamma) seeds over the whole map (no valid-region restriction, so edge blocks may be
    partial), dilated by max_pool2d(b, stride 1, padding b // 2), keep = 1 - dropped,
    y = x * keep * numel / (sum(keep) in f32 + eps), the scale cast to x's dtype."""
    _, _, h, w = x.shape
    b = min(block_size, h, w)
    gamma = _timm_gamma(drop_prob, block_size, gamma_scale, h, w)
    seeds = torch.empty_like(x).bernoulli_(gamma)
    dropped = F.max_pool2d(seeds, kernel_size=b, stride=1, padding=b // 2)
    keep = 1 - dropped
    scale = (keep.numel() / keep.to(torch.float32).sum().add(1e-7)).to(x.dtype)
    return x * keep * scale


def tv_keep_mask(x, p=0.1, block_size=7):
    """The 0/1 keep mask of tv_drop_block_equiv (see there), in x's dtype."""
    spatial = tuple(x.shape[2:])
    k = len(spatial)
    b = min(block_size, *spatial)
    valid = tuple(s - b + 1 for s in spatial)
    gamma = p * math.prod(spatial) / ((b ** k) * math.prod(valid))
    noise = torch.empty((x.shape[0], x.shape[1]) + valid, dtype=x.dtype, device=x.device)
    noise.bernoulli_(gamma)
    noise = F.pad(noise, [b // 2] * (2 * k), value=0)
    pool = F.max_pool2d if k == 2 else F.max_pool3d
    noise = pool(noise, kernel_size=b, stride=1, padding=b // 2)
    return 1 - noise


def tv_drop_block_equiv(x, p=0.1, block_size=7, eps=1e-6):
    """Re-implementation of torchvision.ops.drop_block2d / drop_block3d (inplace=False,
    training=True), for [N, C, H, W] or [N, C, D, H, W]:

    b = min(block_size, spatial sizes); gamma = p * prod(spatial) / (b^k * prod(valid)) with
    valid = spatial - b + 1 per axis; Bernoulli(gamma) noise of shape (N, C, *valid) in x's dtype,
    zero-padded by b // 2 on every side, max-pooled (kernel b, stride 1, padding b // 2),
    mask = 1 - noise (tv_keep_mask), y = x * mask * (mask.numel() / (eps + mask.sum())) (the sum
    in x's dtype, as torchvision does)."""
    mask = tv_keep_mask(x, p, block_size)
    return x * mask * (mask.numel() / (eps + mask.sum()))


# ---------------------------------------------------------------------------------------------
# Peers: (impl name, fn(x) -> y, extra JSON fields)


def _timm_module():
    """timm's drop module (timm.layers.drop; timm.models.layers.drop in older timm) and version."""
    import timm
    last = None
    for name in ("timm.layers.drop", "timm.models.layers.drop"):
        try:
            return importlib.import_module(name), timm.__version__
        except ImportError as e:
            last = e
    raise last


def _timm_args(fn, p, bs):
    """The keyword arguments a call with only drop_prob/block_size set ends up with (timm's defaults
    for the rest), for the JSON rows."""
    try:
        bound = inspect.signature(fn).bind_partial(drop_prob=p, block_size=bs)
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k != "x" and isinstance(v, (bool, int, float))}
    except (TypeError, ValueError):
        return {"drop_prob": p, "block_size": bs}


def timm_peers(p, bs):
    try:
        mod, version = _timm_module()
    except Exception as e:  # noqa: BLE001  (not installed, or broken)
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        extra = dict(reimpl=True, reimpl_reason=why, gamma_scale=GAMMA_SCALE)
        return [
            ("timm.drop_block_2d(reimpl)",
             lambda x: timm_drop_block_2d_equiv(x, p, bs, GAMMA_SCALE), dict(extra)),
            ("timm.drop_block_fast_2d(reimpl)",
             lambda x: timm_drop_block_fast_2d_equiv(x, p, bs, GAMMA_SCALE), dict(extra)),
        ]
    peers = []
    for fname in ("drop_block_2d", "drop_block_fast_2d"):
        fn = getattr(mod, fname, None)
        if fn is None:
            skipped(f"timm.{fname}", "all", f"timm {version} has no {mod.__name__}.{fname}")
            continue
        extra = dict(reimpl=False, timm=version, peer_args=_timm_args(fn, p, bs))
        peers.append((f"timm.{fname}", lambda x, fn=fn: fn(x, drop_prob=p, block_size=bs), extra))
    return peers


def torchvision_peer(dims, p, bs):
    name = f"drop_block{dims}d"
    try:
        import torchvision
        import torchvision.ops
        fn = getattr(torchvision.ops, name)
    except Exception as e:  # noqa: BLE001
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        return (f"torchvision.{name}(reimpl)", lambda x: tv_drop_block_equiv(x, p, bs),
                dict(reimpl=True, reimpl_reason=why))
    return (f"torchvision.{name}",
            lambda x: fn(x, p, bs, inplace=False, eps=1e-06, training=True),
            dict(reimpl=False, torchvision=torchvision.__version__))


# ---------------------------------------------------------------------------------------------
# Measurements


def shape_label(shape):
    return "x".join(str(s) for s in shape)


def run_case(rep, prefix, dtype_name, shape, bs, with_compile):
    """All rows of one shape: copy, the forward peers and (2D) the backward peers."""
    dtype = common.DTYPES[dtype_name]
    n = math.prod(shape)
    size = torch.tensor([], dtype=dtype).element_size()
    data = 2 * n * size
    dims = len(shape) - 2
    fwd, bwd = f"{prefix}_forward", f"{prefix}_backward"
    base = dict(shape=shape_label(shape), block_size=bs, p=P)

    x = torch.randn(shape, device="cuda", dtype=dtype)
    dst = torch.empty_like(x)

    def run(impl, kernel, fn, nbytes, copy, extra=None):
        ms = common.median_ms(fn, LAUNCHES, REPEATS, WARMUP)
        row_extra = dict(base)
        row_extra.update(extra or {})
        # The copy row is its own baseline (copy_fraction 1).
        rep.emit(impl, kernel, dtype_name, n, "burst", LAUNCHES, REPEATS, ms, nbytes,
                 copy if copy != "self" else (ms, nbytes), row_extra)
        return ms

    copy = None
    try:
        copy = (run("copy", "copy", lambda: dst.copy_(x), data, "self"), data)
    except Exception as e:  # noqa: BLE001
        skipped("copy", dtype_name, e)

    peers = (timm_peers(P, bs) if dims == 2 else []) + [torchvision_peer(dims, P, bs)]
    for impl, fn, extra in peers:
        try:
            run(impl, fwd, lambda fn=fn: fn(x), data, copy, extra)
        except Exception as e:  # noqa: BLE001
            skipped(impl, dtype_name, e)

    if dims == 2:
        if with_compile:
            impl = "torch.compile.drop_block_2d"
            try:
                compiled = torch.compile(tv_drop_block_equiv, dynamic=False)
                run(impl, fwd, lambda: compiled(x, P, bs), data, copy, dict(compiled="tv_drop_block_equiv"))
            except Exception as e:  # noqa: BLE001
                skipped(impl, dtype_name, e)
        else:
            skipped("torch.compile.drop_block_2d", dtype_name, "DROPFUSE_BENCH_COMPILE=0")

        # Backward: autograd of the library peers (the drop_block_2d ones; drop_block_fast_2d is
        # skipped: some timm versions do not return its result), then the explicit multiply.
        dy = torch.randn_like(x)
        for impl, fn, extra in peers:
            if "fast" in impl:
                continue
            y = None
            try:
                xg = x.detach().requires_grad_()
                y = fn(xg)
                if y is None or not y.requires_grad:
                    raise RuntimeError("the peer's output has no autograd graph")
                e = dict(extra)
                e["backward"] = "torch.autograd.grad(y, x, dy, retain_graph=True)"
                run(impl, bwd, lambda y=y, xg=xg: torch.autograd.grad(y, xg, dy, retain_graph=True),
                    data, copy, e)
            except Exception as err:  # noqa: BLE001
                skipped(impl, dtype_name, err)
            finally:
                del y
        impl = "torch.mask_mul"
        try:
            with torch.no_grad():
                keep = tv_keep_mask(x, P, bs)
                keep_scaled = (keep * (keep.numel() / keep.to(torch.float32).sum().clamp_min(1))).to(dtype)
                del keep
            dx = torch.empty_like(x)
            run(impl, bwd, lambda: torch.mul(dy, keep_scaled, out=dx), data, copy,
                dict(backward="torch.mul(dy, keep_scaled, out=dx); keep_scaled read but not counted"))
            del keep_scaled, dx
        except Exception as e:  # noqa: BLE001
            skipped(impl, dtype_name, e)
        del dy

    del x, dst
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
    print(f"drop_block peers on {rep.meta['gpu']}: torch {torch.__version__}, p = {P}"
          f"{' (quick)' if args.quick else ''}", flush=True)
    torch.manual_seed(0)
    t0 = time.monotonic()
    for prefix, dtype_name, full, quick, bs in (CASES_2D, CASES_3D):
        shape = quick if args.quick else full
        try:
            run_case(rep, prefix, dtype_name, shape, bs, with_compile)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory allocating x)
            skipped(prefix, dtype_name, e)
            torch.cuda.empty_cache()
    print(f"drop_block peers: done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
