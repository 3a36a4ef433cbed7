#!/usr/bin/env bash
# Kernel tuning: builds the dropout bench once per build variant and packs the executables with a
# runner for a GPU host (no Rust toolchain needed there), so a whole matrix of launch shapes is
# measured in one device call, each next to a device copy timed in the same process.
#
#   bash scripts/variants.sh NAME='NVCC FLAGS' [NAME='NVCC FLAGS' ...]
#   bash scripts/variants.sh base= apply4=-DDROPFUSE_UNROLL_APPLY=4 waves8=-DDROPFUSE_WAVES=8  (overrides the per-kernel choice)
#
# then, on the GPU host from the project root:  bash .gpu-variants/run.sh   (output also in $OUT)
# The knobs are the DROPFUSE_* macros at the top of kernels/dropout.cu and kernels/common/launch.cuh.
# Builds sm_90 only unless DROPFUSE_CUDA_ARCHS is set. .gpu-variants/ is kept out of git.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -gt 0 ] || { sed -n '2,10p' "$0"; exit 2; }
bash scripts/setup-cuda.sh
exclude="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu-variants/' "$exclude" 2>/dev/null || echo '/.gpu-variants/' >>"$exclude"
rm -rf .gpu-variants
mkdir -p .gpu-variants
for spec in "$@"; do
  name=${spec%%=*}
  flags=${spec#*=}
  [ "$name" != "$spec" ] && [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "bad variant '$spec' (want NAME=FLAGS)" >&2; exit 2; }
  echo "building $name: DROPFUSE_NVCC_FLAGS='$flags'"
  exe=$(DROPFUSE_CUDA_ARCHS="${DROPFUSE_CUDA_ARCHS:-sm_90}" DROPFUSE_NVCC_FLAGS="$flags" \
    cargo bench --bench dropout --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -n 1)
  cp "$exe" ".gpu-variants/$name"
  printf '%s\t%s\n' "$name" "$flags" >>.gpu-variants/list
done
cat >.gpu-variants/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs every packed variant's bench summary (burst at 2^28, no sweep, no criterion).
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/variants.txt"
while IFS=$'\t' read -r name flags; do
  echo "### $name: $flags"
  DROPFUSE_BENCH_SWEEP=0 DROPFUSE_BENCH_JSON="$out/variant-$name.jsonl" timeout 120 "$here/$name" --bench __none__ 2>&1 |
    grep -E '^(DROPFUSE_BENCH|SKIPPED)' | sed -E 's/^DROPFUSE_BENCH //; s/ (bytes|gbps|copy_gbps)=[^ ]+//g'
done <"$here/list" | tee -a "$out/variants.txt"
RUN
chmod +x .gpu-variants/run.sh
du -sh .gpu-variants | awk '{print "variants: " $1 " (a device call carries at most 64 MiB)"}'
