#!/usr/bin/env bash
# The CUDA toolkit pieces that `cargo build --features cuda` needs, from PyPI, on a machine
# with no GPU and no system CUDA. Installs them once into a cache folder and prints the
# environment for cargo:
#
#   eval "$(scripts/cuda-toolkit.sh)"
#   cargo build --release --features cuda
#
# Exit status: 0 ready (the export lines are on stdout, progress on stderr); 3 PyPI could not
# be reached (nothing was changed); anything else is an error.
#
# Settings (environment):
#   ZSAD_CUDA_CACHE   where the toolkit goes (default ${XDG_CACHE_HOME:-~/.cache}/zsad-cuda-toolkit)
#   CUDA_COMPUTE_CAP  the GPU the kernels are compiled for (default 90: H100/H200, giving sm_90a
#                     code that runs on those alone). `nvidia-smi --query-gpu=compute_cap
#                     --format=csv` tells a GPU's (8.9 -> 89: RTX 4090, L4, L40; 8.6 -> 86: RTX
#                     3090, A10; 8.0 -> 80: A100, and as PTX for 8.0 it also runs, JIT-compiled,
#                     on any later GPU; 12.0 -> 120: RTX 5090). Read by candle-kernels' build
#                     script (cudaforge 0.1.6 `detect_compute_cap`), which otherwise asks
#                     nvidia-smi and fails without a GPU.
#
# Why CUDA 13.0: PyPI's CUDA 12 wheels (nvidia-cuda-nvcc-cu12 up to 12.9.86) hold ptxas and
# libnvvm only, no nvcc; the CUDA 13 wheels hold the whole compiler and share one toolkit-shaped
# folder (site-packages/nvidia/cu13: bin, include, lib, nvvm) whose nvcc.profile finds its
# headers, cicc and the CCCL headers (include/cccl) by itself, so no -I flags are needed. 13.0
# precisely: cudarc 0.19.10 knows CUDA up to 13.4, and PTX from a newer nvcc is refused by an
# older driver; 13.0 is what a 580 driver (the first for CUDA 13, and the H200 machines' one)
# runs. A binary built here needs, where it runs, a driver >= 580 and the CUDA 13 libraries
# cuBLAS, cuRAND and cudart (`readelf -d` lists them; the wheels nvidia-cublas, nvidia-curand and
# nvidia-cuda-runtime put them in site-packages/nvidia/cu13/lib: add it to LD_LIBRARY_PATH).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# Pinned: the compiler driver and its parts (nvcc; cicc in nvvm; the crt headers nvcc
# includes), the runtime headers and libcudart (cuda_runtime.h, cuda_fp16.h, cuda.h, mma.h;
# candle-kernels links cudart), and CCCL (thrust, cub, cuda/std: candle-kernels' reduce.cu and
# moe_utils.cuh include them).
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
# Bump the suffix when the pins or the layout made below change: a new folder is made.
cache=${ZSAD_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zsad-cuda-toolkit}
dir=$cache/cuda-13.0.88-1
root=$dir/nvidia/cu13

log() { echo "cuda-toolkit: $*" >&2; }

if ! [ -e "$dir/.complete" ]; then
  python=$(command -v python3 || command -v python || true)
  if [ -z "$python" ] || ! "$python" -m pip --version >/dev/null 2>&1; then
    log "pip is needed (python3 -m pip): install python3-pip"
    exit 1
  fi
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.install.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # Reachable? Ask for the smallest pinned wheel, with short timeouts (the environment may set
  # pip's to minutes).
  if ! "$python" -m pip download -q --no-deps --disable-pip-version-check --retries 1 \
    --timeout 20 -d "$tmp/probe" nvidia-cuda-crt==13.0.88 >"$tmp/probe.log" 2>&1; then
    log "PyPI unreachable: $(grep -v '^\s*$' "$tmp/probe.log" | tail -1)"
    exit 3
  fi
  log "installing ${pins[*]} into $dir"
  # --no-deps: the pins are the whole set (nvcc's own requirements name no versions).
  PIP_ROOT_USER_ACTION=ignore "$python" -m pip install -q --no-deps --no-compile --disable-pip-version-check --retries 3 \
    --timeout 60 --target "$tmp/site" "${pins[@]}"
  mv "$tmp/site"/* "$tmp/"
  rm -rf "$tmp/site" "$tmp/probe" "$tmp/probe.log"
  lib=$tmp/nvidia/cu13/lib
  # `-lcudart` (candle-kernels' build.rs) needs the unversioned name.
  ln -s libcudart.so.13 "$lib/libcudart.so"
  # Link-time stubs, as the CUDA toolkit ships lib64/stubs/libcuda.so: libraries of the right
  # SONAME that define the functions cudarc calls (it links them: candle-core turns on cudarc's
  # `dynamic-linking`), so that a binary links here and loads the real ones where it runs.
  # libcuda is the driver's (never on PyPI); the others would be ~1 GB of wheels to link against.
  # Symbol lists: every `pub unsafe fn` of cudarc's generated bindings (sys/mod.rs), from the
  # version Cargo.lock pins.
  ver=$(awk '/^name = "cudarc"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$repo/Cargo.lock")
  src=""
  for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$ver"; do
    [ -d "$d" ] && src=$d
  done
  if [ -z "$src" ]; then
    (cd "$repo" && cargo fetch --locked -q)
    for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$ver"; do
      [ -d "$d" ] && src=$d
    done
  fi
  [ -n "$src" ] || {
    log "cudarc $ver's source is not in the cargo registry (run cargo fetch)"
    exit 1
  }
  mkdir -p "$lib/stubs"
  for spec in cuda:driver:libcuda.so.1 nvrtc:nvrtc:libnvrtc.so.13 curand:curand:libcurand.so.10 \
    cublas:cublas:libcublas.so.13 cublasLt:cublaslt:libcublasLt.so.13; do
    IFS=: read -r name module soname <<<"$spec"
    grep -oP '^pub unsafe fn \K\w+' "$src/src/$module/sys/mod.rs" | sort -u |
      sed 's/.*/void &(void) {}/' >"$tmp/$name.c"
    cc -shared -fPIC -o "$lib/stubs/lib$name.so" -Wl,-soname,"$soname" "$tmp/$name.c"
    rm "$tmp/$name.c"
  done
  "$tmp/nvidia/cu13/bin/nvcc" --version >/dev/null
  touch "$tmp/.complete"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  trap - EXIT
  log "installed"
fi

# nvcc on PATH: cudarc's build script runs `nvcc --version` to pick its CUDA version, and
# cudaforge finds nvcc there. CUDA_HOME: cudarc's link search (lib, lib/stubs).
# ZSAD_CUDA_TOOLKIT: this toolkit's folder (.ci/run keeps its check's target folder there).
cat <<EOF
export PATH="$root/bin:\$PATH"
export CUDA_HOME="$root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export ZSAD_CUDA_TOOLKIT="$dir"
EOF
