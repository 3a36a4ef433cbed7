#!/usr/bin/env python3
"""PyTorch side of the dropout benchmarks: times the peers on the same GPU and sizes as
benches/dropout.rs, with the same method (CUDA events around many back-to-back launches, median of
repeats), and prints lines in the same format:

  PEER_BENCH kernel=... dtype=... n=... ms=... bytes=... gbps=... copy_ms=... copy_fraction=...

Peers: torch.ops.aten.native_dropout (forward, returns a bool mask: one byte per element),
native_dropout_backward, and a device-to-device copy of the same bytes as the baseline.
Usage: python3 benches/peers/dropout_torch.py [log2_n (default 28)]
"""
import json
import os
import sys
import time

import torch

LOG2_N = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("DROPFUSE_BENCH_N", "28"))
N = 1 << LOG2_N
P = 0.1
REPEATS, LAUNCHES = 20, 10


def timed(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(LAUNCHES):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / LAUNCHES)
    times.sort()
    return times[len(times) // 2]


def main():
    gpu = torch.cuda.get_device_name(0)
    out = os.environ.get("DROPFUSE_BENCH_JSON")
    for dtype, name in [(torch.float16, "f16"), (torch.bfloat16, "bf16"), (torch.float32, "f32")]:
        x = torch.randn(N, device="cuda", dtype=dtype)
        dst = torch.empty_like(x)
        size = x.element_size()
        copy_ms = timed(lambda: dst.copy_(x))
        copy_bytes = 2 * N * size
        y, mask = torch.ops.aten.native_dropout(x, P, True)
        rows = [
            # native_dropout writes y and a bool mask (1 byte per element)
            ("forward_mask", lambda: torch.ops.aten.native_dropout(x, P, True), 2 * N * size + N),
            ("backward_mask", lambda: torch.ops.aten.native_dropout_backward(y, mask, 1.0 / (1.0 - P)), 2 * N * size + N),
        ]
        for kernel, fn, nbytes in rows:
            ms = timed(fn)
            gbps = nbytes / ms / 1e6
            frac = gbps / (copy_bytes / copy_ms / 1e6)
            line = (f"PEER_BENCH peer=torch.native_dropout kernel={kernel} dtype={name} n={N} ms={ms:.4f} "
                    f"bytes={nbytes} gbps={gbps:.1f} copy_ms={copy_ms:.4f} copy_fraction={frac:.3f}")
            print(line, flush=True)
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(dict(peer="torch.native_dropout", kernel=kernel, dtype=name, n=N, ms=ms,
                                            bytes=nbytes, gbps=gbps, copy_ms=copy_ms, copy_fraction=frac,
                                            gpu=gpu, torch=torch.__version__, unix_time=int(time.time()))) + "\n")
        del x, dst, y, mask
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
