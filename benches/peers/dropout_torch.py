#!/usr/bin/env python3
"""Peer side of the dropout benchmarks: times PyTorch / Triton equivalents of the dropfuse kernels on
the same GPU, with the same method as benches/dropout.rs (CUDA events around `launches`
back-to-back calls, `repeats` such windows after a warm-up, median per call).

Usage:
  python3 benches/peers/dropout_torch.py [log2_n]
  DROPFUSE_BENCH_JSON=results.jsonl DROPFUSE_COMMIT=$(git rev-parse --short HEAD) \\
      python3 benches/peers/dropout_torch.py

Burst (method "burst"): n = 2^log2_n elements (default 2^28), p = 0.1, f16 / bf16 / f32,
10 launches per window, 20 windows, 5 warm-up calls (compilation for Triton and torch.compile
happens in the warm-up, before any timing):

  impl                    kernel             bytes counted
  copy                    copy               read x + write dst            (dst.copy_(x))
  torch.native_dropout    forward_mask       read x + write y + write bool mask (1 byte/element)
  torch.native_dropout    backward_mask      read dy + read bool mask + write dx
                                             (aten.native_dropout_backward)
  triton.seeded_dropout   forward_maskless   read x + write y  (the Triton tutorial's "low-memory
                                             dropout": tl.rand(seed, offsets), BLOCK_SIZE 1024)
  torch.compile.dropout   forward_maskless   read x + write y  (torch.compile of
                                             F.dropout(x, p, training=True))

Sweep (method "sweep", unless DROPFUSE_BENCH_SWEEP=0): f16 and f32, n = 2^k for
k = 12..=DROPFUSE_BENCH_SWEEP_MAX (default 30): copy, native_dropout forward and backward. Per size
the launches per window are chosen so that one window is >= ~2 ms of GPU time (from a quick
estimate; 10..=20000), 7 windows, median.

Every measurement prints one line

  PEER_BENCH impl=... kernel=... dtype=... n=... method=... ms=... bytes=... gbps=... copy_ms=... copy_fraction=...

and, when DROPFUSE_BENCH_JSON is set, appends one JSON object to that file (the schema shared with
benches/dropout.rs; scripts/bench_report.py joins both sides). copy_fraction is the measurement's
bandwidth over the copy's of the same dtype and n in the same run. A peer that cannot run (no
Triton, torch.compile failure, ...) prints `PEER_SKIPPED impl=... dtype=... reason=...` and the
script goes on.

Environment:
  DROPFUSE_BENCH_N          log2 of the burst element count (default 28; the first argument wins)
  DROPFUSE_BENCH_JSON       file to append JSON lines to
  DROPFUSE_COMMIT           commit recorded in the JSON rows (default "unknown")
  DROPFUSE_BENCH_SWEEP      0 disables the size sweep (default 1)
  DROPFUSE_BENCH_SWEEP_MAX  largest log2 size of the sweep (default 30)
"""
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

P = 0.1
# Burst method: the same constants as benches/dropout.rs.
LAUNCHES, REPEATS, WARMUP = 10, 20, 5
# Sweep method.
SWEEP_MIN_LOG2 = 12
SWEEP_REPEATS = 7
SWEEP_WINDOW_MS = 2.0
SWEEP_MIN_LAUNCHES, SWEEP_MAX_LAUNCHES = 10, 20000
# The sweep stops (with a PEER_SKIPPED line) if it has run longer than this.
SWEEP_BUDGET_S = 90.0
# The Triton kernel's block size (as in the tutorial).
TRITON_BLOCK = 1024
TRITON_SEED = 1234

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def log2_arg():
    s = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DROPFUSE_BENCH_N", "28")
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 5 <= v <= 33:
        print(f"log2 size {s!r} is not in 5..=33: using 28", file=sys.stderr)
        v = 28
    return v


def window_ms(fn, launches):
    """GPU milliseconds of `launches` back-to-back calls, timed with CUDA events."""
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(launches):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def median_ms(fn, launches, repeats, warmup):
    """Median per-call milliseconds over `repeats` windows of `launches` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = sorted(window_ms(fn, launches) / launches for _ in range(repeats))
    return times[len(times) // 2]


def sweep_launches(fn):
    """Launches per window for the sweep: >= SWEEP_WINDOW_MS of GPU time, from a quick estimate."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    est = window_ms(fn, SWEEP_MIN_LAUNCHES) / SWEEP_MIN_LAUNCHES
    if est <= 0:
        return SWEEP_MAX_LAUNCHES
    return max(SWEEP_MIN_LAUNCHES, min(SWEEP_MAX_LAUNCHES, math.ceil(SWEEP_WINDOW_MS / est)))


class Reporter:
    def __init__(self):
        self.path = os.environ.get("DROPFUSE_BENCH_JSON")
        self.meta = dict(
            gpu=torch.cuda.get_device_name(0),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            commit=os.environ.get("DROPFUSE_COMMIT") or "unknown",
            side="peer",
            torch=torch.__version__,
        )

    def emit(self, impl, kernel, dtype, n, method, launches, repeats, ms, nbytes, copy, extra=None):
        """One measurement. `copy` is (copy_ms, copy_bytes) of the same dtype and n, or None."""
        gbps = nbytes / ms / 1e6
        if copy is not None:
            copy_ms, copy_bytes = copy
            copy_gbps = copy_bytes / copy_ms / 1e6
            frac = gbps / copy_gbps
        else:
            copy_ms = copy_gbps = frac = None

        def f(v, spec):
            return "none" if v is None else format(v, spec)

        print(f"PEER_BENCH impl={impl} kernel={kernel} dtype={dtype} n={n} method={method} ms={ms:.4f} "
              f"bytes={nbytes} gbps={gbps:.1f} copy_ms={f(copy_ms, '.4f')} copy_fraction={f(frac, '.3f')}",
              flush=True)
        if self.path:
            row = dict(impl=impl, kernel=kernel, dtype=dtype, n=n, p=P, method=method, launches=launches,
                       repeats=repeats, ms=ms, bytes=nbytes, gbps=gbps, copy_ms=copy_ms, copy_gbps=copy_gbps,
                       copy_fraction=frac)
            row.update(self.meta)
            if extra:
                row.update(extra)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def skipped(impl, dtype, err):
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    print(f"PEER_SKIPPED impl={impl} dtype={dtype} reason={reason}", flush=True)


_TRITON = None


def triton_dropout():
    """(launch(x, out), triton version) for the tutorial's seeded dropout; imports Triton on first use."""
    global _TRITON, triton, tl
    if _TRITON is None:
        import triton
        import triton.language as tl

        @triton.jit
        def seeded_dropout_kernel(x_ptr, out_ptr, n_elements, p, seed, BLOCK_SIZE: tl.constexpr):
            pid = tl.program_id(axis=0)
            offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            in_bounds = offsets < n_elements
            x = tl.load(x_ptr + offsets, mask=in_bounds)
            random = tl.rand(seed, offsets)
            keep = random > p
            output = tl.where(keep, x / (1 - p), 0.0)
            tl.store(out_ptr + offsets, output.to(out_ptr.dtype.element_ty), mask=in_bounds)

        def launch(x, out):
            n = x.numel()
            grid = (triton.cdiv(n, TRITON_BLOCK),)
            seeded_dropout_kernel[grid](x, out, n, P, TRITON_SEED, BLOCK_SIZE=TRITON_BLOCK)

        _TRITON = (launch, triton.__version__)
    return _TRITON


def dropout_eager(x):
    return F.dropout(x, P, training=True)


_COMPILED = None


def compiled_dropout():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(dropout_eager, dynamic=False)
    return _COMPILED


def burst(rep, n):
    for name, dtype in DTYPES.items():
        size = torch.tensor([], dtype=dtype).element_size()
        data = 2 * n * size
        x = torch.randn(n, device="cuda", dtype=dtype)
        dst = torch.empty_like(x)

        def run(impl, kernel, fn, nbytes, copy, extra=None):
            ms = median_ms(fn, LAUNCHES, REPEATS, WARMUP)
            # The copy row is its own baseline (copy_fraction 1).
            rep.emit(impl, kernel, name, n, "burst", LAUNCHES, REPEATS, ms, nbytes,
                     copy if copy != "self" else (ms, nbytes), extra)
            return ms

        copy = None
        try:
            copy = (run("copy", "copy", lambda: dst.copy_(x), data, "self"), data)
        except Exception as e:  # noqa: BLE001
            skipped("copy", name, e)

        y = mask = None
        try:
            y, mask = torch.ops.aten.native_dropout(x, P, True)
            run("torch.native_dropout", "forward_mask", lambda: torch.ops.aten.native_dropout(x, P, True),
                data + n, copy)
        except Exception as e:  # noqa: BLE001
            skipped("torch.native_dropout", name, e)

        try:
            if mask is None:
                raise RuntimeError("no mask from native_dropout")
            scale = 1.0 / (1.0 - P)
            # x plays dy, as in benches/dropout.rs.
            run("torch.native_dropout", "backward_mask",
                lambda: torch.ops.aten.native_dropout_backward(x, mask, scale), data + n, copy)
        except Exception as e:  # noqa: BLE001
            skipped("torch.native_dropout", name, e)
        del y, mask

        try:
            launch, version = triton_dropout()
            run("triton.seeded_dropout", "forward_maskless", lambda: launch(x, dst), data, copy,
                dict(triton=version))
        except Exception as e:  # noqa: BLE001
            skipped("triton.seeded_dropout", name, e)

        try:
            fn = compiled_dropout()
            run("torch.compile.dropout", "forward_maskless", lambda: fn(x), data, copy)
        except Exception as e:  # noqa: BLE001
            skipped("torch.compile.dropout", name, e)

        del x, dst
        torch.cuda.empty_cache()


def sweep(rep, max_log2):
    t0 = time.monotonic()
    for name in ("f16", "f32"):
        dtype = DTYPES[name]
        size = torch.tensor([], dtype=dtype).element_size()
        for k in range(SWEEP_MIN_LOG2, max_log2 + 1):
            if time.monotonic() - t0 > SWEEP_BUDGET_S:
                print(f"PEER_SKIPPED impl=sweep dtype={name} reason=sweep ran past {SWEEP_BUDGET_S:.0f} s "
                      f"at n=2^{k}", flush=True)
                break
            n = 1 << k
            data = 2 * n * size
            x = dst = y = mask = None
            try:
                x = torch.randn(n, device="cuda", dtype=dtype)
                dst = torch.empty_like(x)
                y, mask = torch.ops.aten.native_dropout(x, P, True)
                scale = 1.0 / (1.0 - P)
                copy = None
                cases = [
                    ("copy", "copy", lambda: dst.copy_(x), data),
                    ("torch.native_dropout", "forward_mask", lambda: torch.ops.aten.native_dropout(x, P, True),
                     data + n),
                    ("torch.native_dropout", "backward_mask",
                     lambda: torch.ops.aten.native_dropout_backward(x, mask, scale), data + n),
                ]
                for impl, kernel, fn, nbytes in cases:
                    try:
                        launches = sweep_launches(fn)
                        ms = median_ms(fn, launches, SWEEP_REPEATS, 0)
                        if impl == "copy":
                            copy = (ms, data)
                        rep.emit(impl, kernel, name, n, "sweep", launches, SWEEP_REPEATS, ms, nbytes, copy)
                    except Exception as e:  # noqa: BLE001
                        skipped(impl, f"{name} n=2^{k}", e)
            except Exception as e:  # noqa: BLE001
                skipped("sweep", f"{name} n=2^{k}", e)
            finally:
                del x, dst, y, mask
                torch.cuda.empty_cache()


def main():
    if not torch.cuda.is_available():
        print("SKIPPED: dropout peers: no CUDA device", flush=True)
        return
    rep = Reporter()
    log2_n = log2_arg()
    print(f"dropout peers on {rep.meta['gpu']}: torch {torch.__version__}, n = 2^{log2_n}, p = {P}", flush=True)
    burst(rep, 1 << log2_n)
    if os.environ.get("DROPFUSE_BENCH_SWEEP", "1").strip() != "0":
        max_log2 = int(os.environ.get("DROPFUSE_BENCH_SWEEP_MAX", "30"))
        sweep(rep, max_log2)


if __name__ == "__main__":
    main()
