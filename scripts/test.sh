#!/usr/bin/env bash
# The test command: installs what the build needs (scripts/setup-cuda.sh, idempotent), then runs
# every test (GPU tests print SKIPPED without a GPU), the GPU tests again on the emulated device
# (scripts/emu-gpu-tests.sh --quick: the kernels on the host emulator, a few minutes; EMU=0 leaves
# it out), clippy with -D warnings and the format check; also the bench report's own tests
# (scripts/test_bench_report.py, under a second, python3 only).
#   bash scripts/test.sh            # all of it
#   bash scripts/test.sh -- ARGS    # extra arguments for `cargo test`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-cuda.sh
[ "${1:-}" = "--" ] && shift
if command -v python3 >/dev/null; then
  python3 scripts/test_bench_report.py
else
  echo "SKIPPED: scripts/test_bench_report.py: no python3" >&2
fi
cargo test --all-targets "$@"
cargo test --doc
if [ "${EMU:-1}" != 0 ]; then
  bash scripts/emu-gpu-tests.sh --quick
fi
cargo clippy --all-targets -- -D warnings
cargo fmt --all -- --check
