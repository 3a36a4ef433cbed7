#!/usr/bin/env bash
# Installs what building dropfuse needs on a machine without a CUDA toolkit:
#   * the CUDA compiler (nvcc, cicc, crt headers, static runtime, CCCL) from pinned PyPI wheels into
#     the git-ignored folder .cuda/ of this project, unless an nvcc is already found
#     (NVCC, CUDA_HOME/CUDA_PATH, PATH: the same order build.rs uses);
#   * libclang for bindgen (Debian/Ubuntu: apt-get install libclang-dev), unless one is found.
# Idempotent: a second run with everything in place returns in well under a second.
# build.rs finds .cuda/ by itself, so nothing has to be exported afterwards.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cuda_dir="$root/.cuda"
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
stamp="$cuda_dir/.installed"

say() { echo "setup-cuda: $*" >&2; }

find_system_nvcc() {
  if [ -n "${NVCC:-}" ] && [ -x "${NVCC}" ]; then echo "$NVCC"; return 0; fi
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then echo "$home/bin/nvcc"; return 0; fi
  done
  command -v nvcc 2>/dev/null && return 0
  return 1
}

# ---- CUDA compiler ----
if nvcc_path=$(find_system_nvcc); then
  say "using nvcc at $nvcc_path"
elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ] && [ -x "$cuda_dir/site/nvidia/cu13/bin/nvcc" ]; then
  say "using project-local nvcc at $cuda_dir/site/nvidia/cu13/bin/nvcc"
else
  say "installing the CUDA compiler wheels into $cuda_dir (${pins[*]})"
  py=$(command -v python3 || command -v python) || { say "python3 with pip is needed to install the CUDA wheels"; exit 1; }
  rm -rf "$cuda_dir/site"
  mkdir -p "$cuda_dir"
  "$py" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --no-deps --target "$cuda_dir/site" "${pins[@]}"
  nvcc="$cuda_dir/site/nvidia/cu13/bin/nvcc"
  chmod +x "$cuda_dir/site/nvidia/cu13/bin/"* "$cuda_dir/site/nvidia/cu13/nvvm/bin/"* 2>/dev/null || true
  "$nvcc" --version >/dev/null || { say "installed nvcc does not run: $nvcc"; exit 1; }
  echo "${pins[*]}" >"$stamp"
  say "nvcc installed: $nvcc"
fi

# ---- libclang for bindgen ----
have_libclang() {
  if [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH" 2>/dev/null | grep -qE '^libclang(-[0-9.]+)?\.so'; then return 0; fi
  ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so' && return 0
  ls /usr/lib/llvm-*/lib/ 2>/dev/null | grep -qE '^libclang(-[0-9.]+)?\.so' && return 0
  return 1
}
if have_libclang; then
  say "libclang found"
else
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing libclang-dev with apt-get (bindgen needs libclang)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq libclang-dev >/dev/null
  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
    say "installing libclang-dev with sudo apt-get (bindgen needs libclang)"
    sudo apt-get update -qq >/dev/null
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  else
    say "bindgen needs libclang: install your distribution's libclang package (e.g. 'apt-get install libclang-dev') or set LIBCLANG_PATH"
    exit 1
  fi
  have_libclang || { say "libclang still not found after installing libclang-dev"; exit 1; }
fi
