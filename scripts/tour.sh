#!/usr/bin/env bash
# The main job: runs every kernel on GPU 0, checks it against the CPU reference (bit for bit, or
# within the documented bounds for reductions) and prints throughput and the fraction of a device
# copy; the multi-sample head needs libcublas (a SKIPPED line without it); without a GPU it says
# so and runs the CPU reference. Installs what the build needs first (scripts/setup-cuda.sh,
# idempotent).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-cuda.sh
cargo run --release --example tour -- "$@"
