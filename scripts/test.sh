#!/usr/bin/env bash
# The test command: installs what the build needs (scripts/setup-cuda.sh, idempotent), then runs
# every test (GPU tests print SKIPPED without a GPU), the GPU tests again on the emulated device
# (scripts/emu-gpu-tests.sh --quick: the kernels on the host emulator, a few minutes; EMU=0 leaves
# it out), the static kernel audit (scripts/kernel-audit.sh: spills, launch bounds, 16-byte
# accesses from nvcc's own output, a minute or two on 2 cores; AUDIT=0 leaves it out), clippy with
# -D warnings and the format check; also the bench report's and the audit's own tests
# (scripts/test_bench_report.py, scripts/test_kernel_audit.py: under a second, python3 only).
#   bash scripts/test.sh            # all of it
#   bash scripts/test.sh -- ARGS    # extra arguments for `cargo test`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-cuda.sh
[ "${1:-}" = "--" ] && shift
if command -v python3 >/dev/null; then
  python3 scripts/test_bench_report.py
  python3 scripts/test_kernel_audit.py
else
  echo "SKIPPED: scripts/test_bench_report.py, scripts/test_kernel_audit.py: no python3" >&2
fi
cargo test --all-targets "$@"
cargo test --doc
if [ "${AUDIT:-1}" = 0 ]; then
  :
elif command -v python3 >/dev/null; then
  bash scripts/kernel-audit.sh
else
  echo "SKIPPED: scripts/kernel-audit.sh: no python3" >&2
fi
if [ "${EMU:-1}" != 0 ]; then
  bash scripts/emu-gpu-tests.sh --quick
fi
cargo clippy --all-targets -- -D warnings
cargo fmt --all -- --check
