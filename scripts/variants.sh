#!/usr/bin/env bash
# Kernel tuning: builds the benches (and with --tests the GPU tests) once per build variant and
# packs the executables with a runner for a GPU host (no Rust toolchain needed there), so a whole
# matrix of launch shapes is measured, and checked, in one device call, each next to a device copy
# timed in the same process.
#
#   bash scripts/variants.sh [--tests] NAME='NVCC FLAGS' [NAME='NVCC FLAGS' ...]
#   bash scripts/variants.sh base= waves8=-DDROPFUSE_WAVES=8
#   bash scripts/variants.sh --tests base= lean=-DDROPFUSE_DROP_BLOCK_LEAN=1
#   BENCHES=drop_block bash scripts/variants.sh base= rows0=-DDROPFUSE_DROP_BLOCK_ROWS=0
#
# then, on the GPU host from the project root:  bash .gpu-variants/run.sh   (output also in $OUT)
# BENCHES (default "dropout drop_block") names the benches, and with --tests their *_gpu tests.
# The knobs are the DROPFUSE_* macros at the top of kernels/*.cu and kernels/common/launch.cuh.
# Builds sm_90 only unless DROPFUSE_CUDA_ARCHS is set. .gpu-variants/ is kept out of git; the
# executables travel xz-compressed (a device call carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tests=0
if [ "${1:-}" = "--tests" ]; then
  tests=1
  shift
fi
[ $# -gt 0 ] || { sed -n '2,17p' "$0"; exit 2; }
bash scripts/setup-cuda.sh
exclude="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu-variants/' "$exclude" 2>/dev/null || echo '/.gpu-variants/' >>"$exclude"
rm -rf .gpu-variants
mkdir -p .gpu-variants/stage

# Executables of a cargo --message-format=json stream, one per line.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])'
}

for spec in "$@"; do
  name=${spec%%=*}
  flags=${spec#*=}
  [ "$name" != "$spec" ] && [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "bad variant '$spec' (want NAME=FLAGS)" >&2; exit 2; }
  echo "building $name: DROPFUSE_NVCC_FLAGS='$flags'"
  dir=".gpu-variants/stage/$name"
  mkdir -p "$dir"
  export DROPFUSE_CUDA_ARCHS="${DROPFUSE_CUDA_ARCHS:-sm_90}" DROPFUSE_NVCC_FLAGS="$flags"
  # shellcheck disable=SC2046
  cargo bench $(printf -- '--bench %s ' ${BENCHES:-dropout drop_block}) --no-run --message-format=json | executables |
    while read -r exe; do cp "$exe" "$dir/bench_$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
  if [ "$tests" = 1 ]; then
    # shellcheck disable=SC2046
    cargo test --release $(printf -- '--test %s_gpu ' ${BENCHES:-dropout drop_block}) --no-run --message-format=json |
      executables |
      while read -r exe; do cp "$exe" "$dir/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done
  fi
  strip "$dir"/* 2>/dev/null || true
  printf '%s\t%s\n' "$name" "$flags" >>.gpu-variants/stage/list
done
unset DROPFUSE_NVCC_FLAGS
# The variants' executables are nearly identical: a dictionary larger than one executable lets xz
# store them once (measured: 4 variants of a bench and a test, 77 MB, 59 MB with tar -J, 25 MB so).
tar -C .gpu-variants/stage -cf - . | xz -T1 --lzma2=preset=6,dict=128MiB >.gpu-variants/bins.tar.xz
rm -rf .gpu-variants/stage
cat >.gpu-variants/run.sh <<'RUN'
#!/usr/bin/env bash
# Per variant: its GPU tests (when packed; not the huge ones), then the bench summaries (bursts,
# no sweep, no criterion). Raw JSON lines in $OUT/variants.jsonl, commit field "variant:NAME"; a
# log per step.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
rm -rf "$here/b" && mkdir -p "$here/b"
python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$here/bins.tar.xz" "$here/b"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/variants.txt"
while IFS=$'\t' read -r name flags; do
  echo "### $name: $flags"
  for t in "$here/b/$name"/*_gpu; do
    [ -x "$t" ] || continue
    timeout 300 "$t" --skip huge >"$out/test-$name-$(basename "$t").log" 2>&1
    echo "test $(basename "$t") rc=$? $(grep -E '^test result' "$out/test-$name-$(basename "$t").log" | tail -n 1)"
  done
  for b in "$here/b/$name"/bench_*; do
    DROPFUSE_BENCH_SWEEP=0 DROPFUSE_COMMIT="variant:$name" DROPFUSE_BENCH_JSON="$out/variants.jsonl" timeout 120 "$b" --bench __none__ 2>&1 |
      grep -E '^(DROPFUSE_BENCH|SKIPPED)' | sed -E 's/^DROPFUSE_BENCH //; s/ (bytes|gbps|copy_gbps|method)=[^ ]+//g'
  done
done <"$here/b/list" | tee -a "$out/variants.txt"
RUN
chmod +x .gpu-variants/run.sh
du -sh .gpu-variants | awk '{print "variants: " $1 " (a device call carries at most 64 MiB)"}'
