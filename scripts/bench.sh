#!/usr/bin/env bash
# Every speed figure of the crate, reproduced with one command on a GPU machine:
#   bash scripts/bench.sh               # summary timings only, both sides
#   bash scripts/bench.sh --criterion   # also criterion's own statistics for every benchmark
# 1. dropfuse: every [[bench]] of Cargo.toml (benches/*.rs: CUDA-event timed, a device copy of the
#              same bytes in the same run), built once, then run one after the other
# 2. peers:    every benches/peers/*_torch.py (PyTorch eager / torch.compile / library peers of the
#              same kernels); skipped with a note when python3 cannot import torch
# 3. report:   scripts/bench_report.py joins both sides into benches/results/DATE-GPU.json, rewrites
#              the generated section of BENCHMARKS.md and prints the acceptance check.
# A bench or peer script that fails is reported at the end and does not stop the others; the exit
# status is then 1 (after the report).
# Raw JSON lines go to benches/results/DATE-GPU.jsonl (appended; the report keeps the last of duplicates).
# Environment: DROPFUSE_BENCH_N, DROPFUSE_BENCH_SWEEP, DROPFUSE_BENCH_SWEEP_MAX (see benches/dropout.rs),
# DROPFUSE_BENCH_COMPILE=0 (peer scripts that have torch.compile peers skip them; the dropout
# peer ignores it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-cuda.sh
filter=(__none__)  # criterion runs nothing; the bench's own summary timings still run
[ "${1:-}" = "--criterion" ] && filter=()
if ! gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) || [ -z "$gpu" ]; then
  echo "scripts/bench.sh: no NVIDIA GPU visible (nvidia-smi failed): nothing to measure" >&2
  exit 1
fi
slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
raw="benches/results/$(date -u +%F)-$slug.jsonl"
mkdir -p benches/results
export DROPFUSE_BENCH_JSON="$PWD/$raw"
DROPFUSE_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export DROPFUSE_COMMIT

# The bench targets, in Cargo.toml's order (dropout and drop_block first).
mapfile -t benches < <(awk '/^\[\[bench\]\]/ { b = 1; next } /^\[/ { b = 0 }
  b && /^name *=/ { gsub(/^name *= *"|".*$/, ""); print }' Cargo.toml)
[ "${#benches[@]}" -gt 0 ] || { echo "scripts/bench.sh: no [[bench]] in Cargo.toml" >&2; exit 1; }
failed=()
cargo bench --no-run "${benches[@]/#/--bench=}"
for b in "${benches[@]}"; do
  echo "scripts/bench.sh: cargo bench --bench $b" >&2
  cargo bench --bench "$b" -- "${filter[@]}" || failed+=("cargo bench --bench $b")
done
if python3 -c 'import torch' 2>/dev/null; then
  # dropout and drop_block first (as before), then the others by name.
  peers=()
  for p in benches/peers/dropout_torch.py benches/peers/drop_block_torch.py benches/peers/*_torch.py; do
    [ -f "$p" ] || continue
    case " ${peers[*]-} " in *" $p "*) ;; *) peers+=("$p") ;; esac
  done
  for p in "${peers[@]}"; do
    echo "scripts/bench.sh: python3 $p" >&2
    python3 "$p" || failed+=("python3 $p")
  done
else
  echo "scripts/bench.sh: python3 cannot import torch: peer timings skipped (pip install torch triton)" >&2
fi
python3 scripts/bench_report.py "$raw" --write-json "${raw%.jsonl}.json" --update BENCHMARKS.md
python3 scripts/bench_report.py "$raw" --check || true
if [ "${#failed[@]}" -gt 0 ]; then
  echo "scripts/bench.sh: ${#failed[@]} command(s) failed (some or all of their rows are missing from the report):" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
