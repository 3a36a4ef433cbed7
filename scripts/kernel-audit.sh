#!/usr/bin/env bash
# Static kernel audit, no GPU needed: compiles every kernels/*.cu with the nvcc and the flags build.rs
# uses (the cc crate's nvcc command: -O3 -std=c++17 -I kernels -lineinfo, one -gencode
# per DROPFUSE_CUDA_ARCHS entry, default sm_80,sm_90,compute_90, and DROPFUSE_NVCC_FLAGS; nvcc
# itself reads NVCC_PREPEND_FLAGS / NVCC_APPEND_FLAGS / NVCC_CCBIN), plus `-Xptxas -v` and `--keep`
# (the PTX ptxas compiled), into a temporary folder; then scripts/kernel_audit.py checks, per
# kernel and target:
#   a. no spill stores/loads and no stack frame, except its ALLOWLIST (each entry with a reason);
#   b. __launch_bounds__ on every __global__ (source and PTX .maxntid), registers x max threads
#      within the 64K register file, static shared memory <= 48 KB;
#   c. 16-byte global loads/stores in the PTX of the bandwidth kernels' vector instantiations;
#   d. prints a table (registers, spills, shared memory, 16-byte accesses, blocks per SM).
# Exit status 1 with a FAIL line naming kernel, target and what to do.
#   bash scripts/kernel-audit.sh            # all of it (about a minute and a half on 2 free cores)
#   bash scripts/kernel-audit.sh -v         # also every allowed spill, one line each
# Environment: NVCC, DROPFUSE_CUDA_ARCHS, DROPFUSE_NVCC_FLAGS as for build.rs; AUDIT_JOBS (parallel
# nvcc runs, default: the CPU count); AUDIT_KEEP=DIR (new or empty) keeps the PTX and ptxas reports.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
start=$SECONDS

# nvcc, in build.rs's order: NVCC (a path, or a name on PATH), CUDA_HOME / CUDA_PATH, PATH, .cuda/.
find_nvcc() {
  if [ -n "${NVCC:-}" ]; then
    if [ -f "$NVCC" ]; then echo "$NVCC"; return 0; fi
    command -v "$NVCC" 2>/dev/null && return 0
    echo "kernel-audit: NVCC=$NVCC does not exist" >&2; return 2
  fi
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [ -n "$home" ] && [ -f "$home/bin/nvcc" ]; then echo "$home/bin/nvcc"; return 0; fi
  done
  command -v nvcc 2>/dev/null && return 0
  if [ -f "$root/.cuda/site/nvidia/cu13/bin/nvcc" ]; then echo "$root/.cuda/site/nvidia/cu13/bin/nvcc"; return 0; fi
  return 1
}
rc=0; nvcc=$(find_nvcc) || rc=$?
if [ $rc = 1 ]; then
  bash scripts/setup-cuda.sh
  nvcc=$(find_nvcc)
elif [ $rc != 0 ]; then
  exit 1
fi
command -v python3 >/dev/null || { echo "kernel-audit: python3 is needed" >&2; exit 1; }

# -gencode values, as build.rs's parse_archs.
archs=${DROPFUSE_CUDA_ARCHS:-sm_80,sm_90,compute_90}
gencode=()
IFS=, read -ra items <<<"$archs"
for item in "${items[@]}"; do
  item=$(echo "$item" | tr -d '[:space:]')
  [ -z "$item" ] && continue
  case "$item" in
    sm_[0-9]*) gencode+=(-gencode "arch=compute_${item#sm_},code=$item") ;;
    compute_[0-9]*) gencode+=(-gencode "arch=$item,code=$item") ;;
    *) echo "kernel-audit: DROPFUSE_CUDA_ARCHS=$archs: \`$item\`: expected sm_XY or compute_XY" >&2; exit 1 ;;
  esac
done
[ ${#gencode[@]} -gt 0 ] || { echo "kernel-audit: DROPFUSE_CUDA_ARCHS=$archs: the list is empty" >&2; exit 1; }
read -ra extra <<<"${DROPFUSE_NVCC_FLAGS:-}"

if [ -n "${AUDIT_KEEP:-}" ]; then
  work=$AUDIT_KEEP; mkdir -p "$work"
  [ -z "$(ls -A "$work")" ] || { echo "kernel-audit: AUDIT_KEEP=$work is not empty" >&2; exit 1; }
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/kernel-audit.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi

# build.rs's flags (one cc build per .cu file, so no --device-c; host-only -Xcompiler flags do not
# change device code), with -fatbin instead of -c: the same cicc and ptxas runs without the
# host compilation (about a tenth of the time; identical ptxas reports). Largest files first.
flags=(-O3 -std=c++17 -I "$root/kernels" -lineinfo -Xcompiler=-fPIC "${gencode[@]}" ${extra[@]+"${extra[@]}"}
  -fatbin -Xptxas -v)
export nvcc work
jobs=${AUDIT_JOBS:-$(nproc 2>/dev/null || echo 2)}
echo "kernel-audit: $nvcc ($("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')), $archs, ${extra[*]:-no extra flags}, $jobs jobs" >&2
# shellcheck disable=SC2016
ls -S kernels/*.cu | xargs -P "$jobs" -I{} bash -c '
  f=$1; shift; s=$(basename "$f" .cu); mkdir -p "$work/$s"
  if ! "$nvcc" "$@" --keep --keep-dir "$work/$s" -o "$work/$s/$s.fatbin" "$f" >"$work/$s.log" 2>&1; then
    cat "$work/$s.log" >&2; echo "kernel-audit: nvcc failed on $f" >&2; exit 255
  fi' _ {} "${flags[@]}" || { echo "kernel-audit: FAILED: nvcc could not compile kernels/ (above)" >&2; exit 1; }
# Only the PTX and the logs are read; the rest of --keep's files can go.
find "$work" -mindepth 2 -type f ! -name '*.ptx' -delete

status=0
python3 scripts/kernel_audit.py --work "$work" --src kernels --archs "$archs" "$@" || status=$?
echo "kernel-audit: $((SECONDS - start)) s" >&2
exit $status
