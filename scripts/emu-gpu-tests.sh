#!/usr/bin/env bash
# The GPU test files on the emulated device, for machines without a GPU: builds the crate with
# DROPFUSE_HOST_EMULATION=1 (build.rs: the kernels on the host's fiber emulator, libcuda and
# libcublas stand-ins from tests/host_emu/fake_*.cpp) in its own target directory, and runs each
# tests/*_gpu.rs there (CUDA graph capture included: the stand-in driver records and replays). What
# the emulation cannot run is skipped by name: the `huge` tests (over 2^32 elements: hours on the
# emulator, tens of GiB).
# It checks the Rust layer, the launchers and the kernels' results against the CPU reference, not
# speed, inter-block races or the real driver; a GPU run remains the acceptance.
#   bash scripts/emu-gpu-tests.sh                 # every GPU test file
#   bash scripts/emu-gpu-tests.sh dropout_gpu     # some of them (file stems)
#   bash scripts/emu-gpu-tests.sh -- ARGS         # extra libtest arguments (a filter, --nocapture)
#   bash scripts/emu-gpu-tests.sh --quick         # without the tests that take minutes on the
#                                                 # emulator (the list below; what scripts/test.sh runs)
# Environment: DROPFUSE_PROPTEST_CASES (default here: 8 cases per property), CARGO_TARGET_DIR
# (default target/host-emulation, so that normal builds are not rebuilt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-cuda.sh
# Minutes each on the emulator (2 cores), for sizes that matter on a GPU: more blocks or tiles than
# an H200 runs at once, 2^20 sequences, the full 227 KB of shared memory, repeated medium heads.
slow=(gpu_drop_block_full_shared_memory gpu_more_tiles_than_blocks head_is_deterministic
  gpu_routing_more_sequences_than_blocks gpu_routing_rows_edge_shapes gpu_routing_selection_edge_cases)
skips=(--skip huge)
files=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  if [ "$1" = --quick ]; then
    for t in "${slow[@]}"; do skips+=(--skip "$t"); done
  else
    files+=("$1")
  fi
  shift
done
[ "${1:-}" = "--" ] && shift
if [ ${#files[@]} -eq 0 ]; then
  for f in tests/*_gpu.rs; do files+=("$(basename "$f" .rs)"); done
fi
args=()
for f in "${files[@]}"; do args+=(--test "$f"); done
export DROPFUSE_HOST_EMULATION=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/host-emulation}"
export DROPFUSE_PROPTEST_CASES="${DROPFUSE_PROPTEST_CASES:-8}"
cargo test --no-fail-fast "${args[@]}" -- "${skips[@]}" "$@"
