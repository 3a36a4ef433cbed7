#!/usr/bin/env bash
# One prepared GPU call for a GPU host without a Rust toolchain (the project's device sessions):
#   bash scripts/gpu-session.sh            # here: build release tests, benches and the tour/fuzz
#                                          # examples, pack them xz-compressed into .gpu-session/
# then on the GPU host, from the project root (carry .gpu-session):
#   bash .gpu-session/run.sh               # phases below, every log under $OUT (or .gpu-session/out)
#
# Phases, in this order (the benches first on an idle GPU: a warm GPU slowed the Philox kernels):
#   1. benches (BENCH=0 skips): every bench executable, JSON lines to $OUT/results.jsonl
#   2. peers (PEERS=0 skips): benches/peers/*_torch.py appending to the same file, then the report
#      and the acceptance check (scripts/bench_report.py)
#   3. tests: every test executable with `--skip huge` (TEST_ARGS adds arguments)
#   4. the tour (examples/tour) and FUZZ_SECONDS of fuzzing (default 60)
#   5. the `huge` tests (tensors over 2^32 elements), while time is left (HUGE=0 skips)
# PHASES (default "bench peers tests tour fuzz huge") picks the phases and their order, e.g.
# PHASES="tests tour fuzz" for a first call that checks before it measures.
# DEADLINE (seconds from the start, default 540) stops starting new steps after it; every step
# also has its own timeout. SANITIZE=memcheck|racecheck|synccheck|initcheck runs phase 3 under
# compute-sanitizer instead of everything else (SANITIZE_TESTS="drop_block_gpu routing_gpu": only
# those test executables). libcublas (the multi-sample head) is looked up in the Python
# packages (PyTorch's nvidia wheels) and put on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-cuda.sh
# The lent GPU is an H200 (sm_90): one architecture keeps the bundle and the build small.
export DROPFUSE_CUDA_ARCHS=${DROPFUSE_CUDA_ARCHS:-sm_90}
dest=.gpu-session
rm -rf "$dest" && mkdir -p "$dest/stage/tests" "$dest/stage/benches" "$dest/stage/examples"
exclude="$(git rev-parse --git-dir)/info/exclude"
grep -qx "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >>"$exclude"

collect() { # $1 = dest folder, $2 = test|example; stdin = cargo's JSON messages
  python3 -c '
import json, os, shutil, sys
dest, kind = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kinds = m.get("target", {}).get("kind", [])
    if kind == "example" and "example" not in kinds:
        continue
    if kind == "test" and not m.get("profile", {}).get("test"):
        continue
    name = m["target"]["name"]
    # CPU-only test binaries run in CI already: not packed
    if kind == "test" and (name.startswith("reference_") or name.endswith("_host_emulation")
                           or name in ("api_cpu", "philox_kat", "schedule", "layer_plan")
                           or (kind == "test" and dest.endswith("benches") and name == "dropfuse")):
        continue
    shutil.copy2(m["executable"], os.path.join(dest, name))
    print("  packed", kind, name)
' "$1" "$2"
}
echo "building release test executables..."
cargo test --release --no-run --message-format=json 2>/dev/null | collect "$dest/stage/tests" test
echo "building release bench executables..."
cargo bench --no-run --message-format=json 2>/dev/null | collect "$dest/stage/benches" test
echo "building release examples (tour, fuzz)..."
cargo build --release --examples --message-format=json 2>/dev/null | collect "$dest/stage/examples" example
# Benches and tests are also run by name below; drop the examples' own test harness copies.
rm -f "$dest/stage/tests/tour" "$dest/stage/tests/fuzz"
git rev-parse --short HEAD >"$dest/stage/COMMIT" 2>/dev/null || echo unknown >"$dest/stage/COMMIT"
# Every executable embeds the same kernels: a dictionary larger than one executable lets xz store
# them once (measured: 5 executables of 19 MB, 81 MB with the default dictionary, 17 MB with this).
tar -C "$dest/stage" -cf - . | xz -T1 --lzma2=preset=6,dict=128MiB >"$dest/bundle.tar.xz"
rm -rf "$dest/stage"

cat >"$dest/run.sh" <<'EOF'
#!/usr/bin/env bash
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=${OUT:-$here/out}
work=$(mktemp -d)  # outside $OUT: only logs come back
mkdir -p "$out/logs"
start=$(date +%s)
deadline=${DEADLINE:-540}
left() { echo $((deadline - ($(date +%s) - start))); }
python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$here/bundle.tar.xz" "$work"
export DROPFUSE_COMMIT=$(cat "$work/COMMIT")
export DROPFUSE_BENCH_JSON="$out/results.jsonl"
export DROPFUSE_BENCH_SWEEP=${DROPFUSE_BENCH_SWEEP:-0}  # the size sweeps take minutes: opt in
cublas=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
for d in site.getsitepackages():
    for p in glob.glob(os.path.join(d, "nvidia", "**", "libcublas.so*"), recursive=True):
        print(os.path.dirname(p)); raise SystemExit
PY
)
[ -n "$cublas" ] && export LD_LIBRARY_PATH="$cublas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
summary=()
step() { # name, timeout, log, command...
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(left)
  if [ "$t" -le 5 ]; then summary+=("$name: not started (deadline)"); return; fi
  [ "$limit" -gt "$t" ] && limit=$t
  echo "=== $name (timeout ${limit}s)" | tee -a "$out/logs/$log"
  local s=$(date +%s)
  timeout -k 5 "$limit" "$@" >>"$out/logs/$log" 2>&1
  local rc=$?
  local res=$(grep -E '^test result:' "$out/logs/$log" | tail -n 1)
  summary+=("$name: rc=$rc $(( $(date +%s) - s ))s ${res}")
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader >"$out/logs/gpu.txt" 2>&1
echo "cublas: ${cublas:-not found}" >>"$out/logs/gpu.txt"
if [ -n "${SANITIZE:-}" ]; then
  for t in "$work"/tests/*; do
    case " ${SANITIZE_TESTS:-$(basename "$t")} " in *" $(basename "$t") "*) ;; *) continue ;; esac
    step "$SANITIZE $(basename "$t")" 240 sanitize.log compute-sanitizer --tool "$SANITIZE" --error-exitcode 99 \
      "$t" --test-threads=1 --skip huge ${TEST_ARGS:-}
  done
else
  phase_bench() {
    [ "${BENCH:-1}" != 0 ] || return 0
    for b in "$work"/benches/*; do step "bench $(basename "$b")" 150 bench.log "$b" --bench ${BENCH_ARGS:-__none__}; done
  }
  phase_peers() {
    [ "${PEERS:-1}" != 0 ] && python3 -c 'import torch' 2>/dev/null || return 0
    for p in "$root"/benches/peers/*_torch.py; do step "peer $(basename "$p")" 200 peers.log python3 "$p"; done
    python3 "$root/scripts/bench_report.py" "$out/results.jsonl" --write-json "$out/results.json" >"$out/logs/report.md" 2>&1
    python3 "$root/scripts/bench_report.py" "$out/results.jsonl" --check >"$out/logs/check.txt" 2>&1
  }
  phase_tests() {
    for t in "$work"/tests/*; do step "test $(basename "$t")" 240 tests.log "$t" --skip huge ${TEST_ARGS:-}; done
  }
  phase_tour() { step "tour" 120 tour.log "$work/examples/tour"; }
  phase_fuzz() {
    step "fuzz" $(( ${FUZZ_SECONDS:-60} + 30 )) fuzz.log "$work/examples/fuzz" --seconds "${FUZZ_SECONDS:-60}"
  }
  phase_huge() {
    [ "${HUGE:-1}" != 0 ] || return 0
    for t in "$work"/tests/*; do step "huge $(basename "$t")" 240 huge.log "$t" huge --test-threads=1; done
  }
  for phase in ${PHASES:-bench peers tests tour fuzz huge}; do
    case "$phase" in
      bench | peers | tests | tour | fuzz | huge) "phase_$phase" ;;
      *) summary+=("unknown phase '$phase' (bench peers tests tour fuzz huge)") ;;
    esac
  done
fi
{ echo "---- summary ($(( $(date +%s) - start ))s) ----"; for s in "${summary[@]}"; do echo "$s"; done; } | tee "$out/logs/summary.txt"
tar -C "$out" -czf "$out/logs.tar.gz" logs && rm -rf "$out/logs"
rm -rf "$work"
EOF
chmod +x "$dest/run.sh"
du -sh "$dest" | awk '{print "bundle: " $1 " (a device call carries at most 64 MiB)"}'
echo "on the GPU host: bash $dest/run.sh   (carry $dest; OUT, PHASES, DEADLINE, BENCH, PEERS, HUGE, SANITIZE, SANITIZE_TESTS, FUZZ_SECONDS)"
