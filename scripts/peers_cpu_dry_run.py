#!/usr/bin/env python3
"""Runs the peer benchmark scripts (benches/peers/*_torch.py) on the CPU, to find their bugs before
a GPU session spends its minutes on them: every peer the script times must run and emit its
PEER_BENCH row. It checks the scripts' logic (shapes, dtypes, the PyTorch calls, the reporter), not
speed: the times it prints are CPU times and mean nothing.

How: before the script runs (as __main__, with runpy), `torch.cuda` is faked (is_available, events
timed with the host clock, synchronize, device name "CPU dry run"), a TorchFunctionMode moves every
tensor the script puts on "cuda" to the CPU, torch.compile returns the function itself (eager:
Inductor's GPU path cannot run here), and the shared timer (dropout_torch.median_ms) calls the
function twice instead of hundreds of times. Triton kernels cannot run on the CPU: their peers are
expected to print PEER_SKIPPED, and are listed as such.

Usage (needs torch; not part of CI, which does not install it):
  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch
  /tmp/torchenv/bin/python scripts/peers_cpu_dry_run.py                 # every peer script, --quick
  /tmp/torchenv/bin/python scripts/peers_cpu_dry_run.py skip routing    # some (file stems, no _torch)
  /tmp/torchenv/bin/python scripts/peers_cpu_dry_run.py --full --json F  # the benchmarked shapes
      (minutes, several GiB), rows appended to F: `python3 scripts/bench_report.py F --check` must
      then find every peer row an acceptance target needs (only the dropfuse side MISSING)
Exit status 1 when a script fails, prints no PEER_BENCH row, or prints a PEER_SKIPPED line other
than the expected ones (Triton; torchvision/timm missing: their re-implementations run instead).
"""
import contextlib
import glob
import io
import os
import runpy
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "benches", "peers")
# Arguments per script: the small shapes (dropout_torch takes a log2 size, not --quick).
ARGS = {"dropout_torch.py": ["16"]}
# With --full: the benchmarked shapes (dropout's burst at 2^24: its targets were measured on a GPU).
FULL_ARGS = {"dropout_torch.py": ["24"]}
FULL = False
# Skips that are expected on the CPU: (substring of the impl, substring of the reason).
EXPECTED_SKIPS = [("triton", ""), ("", "triton"), ("", "Triton")]


def install_fakes(torch):
    from torch.overrides import TorchFunctionMode

    def is_cuda(d):
        if isinstance(d, torch.device):
            return d.type == "cuda"
        return isinstance(d, (str, int)) and not isinstance(d, bool) and (
            isinstance(d, int) or d.startswith("cuda"))

    class ToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if "device" in kwargs and kwargs["device"] is not None and is_cuda(kwargs["device"]):
                kwargs["device"] = "cpu"
            name = getattr(func, "__name__", "")
            if name in ("to", "cuda"):
                args = tuple("cpu" if (i > 0 and is_cuda(a)) else a for i, a in enumerate(args))
                if name == "cuda":
                    return args[0]
            return func(*args, **kwargs)

    class Event:
        def __init__(self, enable_timing=False, **_):
            self.t = None

        def record(self, stream=None):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.Event = Event
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.get_device_name = lambda *a, **k: "CPU dry run"
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.max_memory_allocated = lambda *a, **k: 0
    torch.compile = lambda fn=None, **kw: (fn if fn is not None else (lambda f: f))
    real_generator = torch.Generator
    torch.Generator = lambda device="cpu": real_generator(device="cpu" if is_cuda(device) else device)
    mode = ToCpu()
    mode.__enter__()  # for the whole process


def run_one(path):
    sys.path.insert(0, PEERS)
    import dropout_torch

    def median_ms(fn, launches, repeats, warmup):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    dropout_torch.median_ms = median_ms
    name = os.path.basename(path)
    # dropout_torch.py's sweep: up to the burst size only (on the CPU, larger sizes take minutes).
    os.environ["DROPFUSE_BENCH_SWEEP_MAX"] = (FULL_ARGS if FULL else ARGS)["dropout_torch.py"][0]
    argv = [path] + (FULL_ARGS if FULL else ARGS).get(name, [] if FULL else ["--quick"])
    out = io.StringIO()
    status = 0
    saved = sys.argv
    sys.argv = argv
    t0 = time.monotonic()
    try:
        with contextlib.redirect_stdout(out):
            if name == "dropout_torch.py":
                dropout_torch.main()  # the patched module (run_path would load a fresh copy)
            else:
                runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        status = e.code or 0
    except Exception as e:  # noqa: BLE001
        status = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=out)
    finally:
        sys.argv = saved
    text = out.getvalue()
    rows = [line for line in text.splitlines() if line.startswith("PEER_BENCH ")]
    skips = [line for line in text.splitlines() if line.startswith("PEER_SKIPPED ")]
    bad = [s for s in skips if not any(i in s.split(" reason=")[0] and r in s for i, r in EXPECTED_SKIPS)]
    ok = status == 0 and bool(rows) and not bad
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {len(rows)} PEER_BENCH rows, {len(skips) - len(bad)} expected "
          f"skips, {len(bad)} unexpected, exit {status!r}, {time.monotonic() - t0:.1f} s", flush=True)
    for line in rows:
        print("    " + " ".join(w for w in line.split() if w.split("=")[0] in ("impl", "kernel", "dtype", "n")))
    for line in skips:
        print(("    UNEXPECTED " if line in bad else "    expected ") + line[:400])
    if not ok and (not rows or status != 0):
        print("    output tail:\n      " + "\n      ".join(text.splitlines()[-15:]))
    return ok


def main():
    global FULL
    import torch
    install_fakes(torch)
    torch.manual_seed(0)
    stems = sys.argv[1:]
    if "--full" in stems:
        FULL = True
        stems.remove("--full")
    if "--json" in stems:
        i = stems.index("--json")
        os.environ["DROPFUSE_BENCH_JSON"] = os.path.abspath(stems[i + 1])
        del stems[i:i + 2]
    os.environ.setdefault("DROPFUSE_COMMIT", "cpu-dry-run")
    paths = sorted(glob.glob(os.path.join(PEERS, "*_torch.py")))
    if stems:
        paths = [p for p in paths if os.path.basename(p)[: -len("_torch.py")] in stems]
    results = [run_one(p) for p in paths]
    print(f"{sum(results)} of {len(results)} peer scripts ran on the CPU without unexpected skips")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
