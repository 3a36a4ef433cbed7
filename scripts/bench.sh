#!/usr/bin/env bash
# Every speed figure of the crate, reproduced with one command on a GPU machine:
#   bash scripts/bench.sh               # summary timings only (burst at 2^28 + size sweep), both sides
#   bash scripts/bench.sh --criterion   # also criterion's own statistics for every benchmark
# 1. dropfuse: benches/dropout.rs and benches/drop_block.rs (CUDA-event timed, a device copy of the
#              same bytes in the same run)
# 2. peers:    benches/peers/dropout_torch.py (PyTorch native_dropout, Triton, torch.compile) and
#              benches/peers/drop_block_torch.py (timm, torchvision, torch.compile); skipped with a
#              note when python3 cannot import torch
# 3. report:   scripts/bench_report.py joins both sides into benches/results/DATE-GPU.json, rewrites
#              the generated section of BENCHMARKS.md and prints the acceptance check.
# Raw JSON lines go to benches/results/DATE-GPU.jsonl (appended; the report keeps the last of duplicates).
# Environment: DROPFUSE_BENCH_N, DROPFUSE_BENCH_SWEEP, DROPFUSE_BENCH_SWEEP_MAX (see benches/dropout.rs).
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
cargo bench --bench dropout --bench drop_block -- "${filter[@]}"
if python3 -c 'import torch' 2>/dev/null; then
  python3 benches/peers/dropout_torch.py
  python3 benches/peers/drop_block_torch.py
else
  echo "scripts/bench.sh: python3 cannot import torch: peer timings skipped (pip install torch triton)" >&2
fi
python3 scripts/bench_report.py "$raw" --write-json "${raw%.jsonl}.json" --update BENCHMARKS.md
python3 scripts/bench_report.py "$raw" --check || true
