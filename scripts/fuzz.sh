#!/usr/bin/env bash
# Fuzzing run: every kernel on GPU 0 against the CPU reference (bit for bit; the weighted
# cross-entropy, MC-dropout summaries, attention importance and the multi-sample head within their
# documented bounds; head cases SKIPPED, and said so, without libcublas), on random cases for
# SECONDS seconds (default 60); without a GPU, randomized self-checks of the CPU reference
# instead. Installs what the build needs first (scripts/setup-cuda.sh, idempotent).
#   bash scripts/fuzz.sh [SECONDS] [extra args for examples/fuzz.rs: --seed U64 --max-n N --case CASE]
# Exit status 1 if any case mismatched; each mismatch prints a `--case ...` reproducer.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-cuda.sh
seconds=${1:-60}
[ $# -gt 0 ] && shift
cargo run --release --example fuzz -- --seconds "$seconds" "$@"
