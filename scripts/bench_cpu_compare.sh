#!/usr/bin/env bash
# zsad against OpenVINO and PyTorch on this machine's CPU, in one run (issue 25): the CLIP image
# tower at ViT-B/16@224 and ViT-L/14@518, f32 and (where the CPU has AVX512-BF16 or AMX-BF16)
# bf16, the same threads, batch and model shapes for all; prints a Markdown table with ms per
# image, GFLOP/s and the ratios zsad/OpenVINO and zsad/PyTorch. See bench_cpu_compare.py.
#
#   scripts/bench_cpu_compare.sh --setup                  # once: the Python venv (below)
#   scripts/bench_cpu_compare.sh --json cpu_compare.json  # everything, all CPUs as threads
#   scripts/bench_cpu_compare.sh --threads 8 --batch5 --rounds 2
#   scripts/bench_cpu_compare.sh --models b16 --zsad-bin target/release/deps/encoder-<hash>
#
# zsad's side is `cargo bench --bench encoder` (built first with --no-run; that build is not
# timed), or --zsad-bin with a built bench binary. Python: $PYTHON, else the venv
# $ZSAD_BENCH_VENV (default: ../venv-bench beside the repository), else python3.
#
# --setup makes that venv with the versions this script was written against. PyPI's Linux torch
# wheel is the CUDA build: with its nvidia-* and triton dependencies the venv is about 5.8 GB
# (torch 1.2 GB, nvidia libraries 3.0 GB, triton 1.0 GB, openvino 0.2 GB, transformers 0.1 GB);
# only the CPU is used. Where PyTorch's own CPU wheel index is reachable, set
# ZSAD_BENCH_TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the 0.2 GB CPU build instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
venv=${ZSAD_BENCH_VENV:-$(dirname "$repo")/venv-bench}

if [ "${1:-}" = "--setup" ]; then
  shift
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  if [ -n "${ZSAD_BENCH_TORCH_INDEX:-}" ]; then
    "$venv/bin/pip" install -q torch --index-url "$ZSAD_BENCH_TORCH_INDEX"
  else
    "$venv/bin/pip" install -q torch==2.15.0
  fi
  "$venv/bin/pip" install -q transformers==5.25.0 openvino==2026.4.1 numpy==2.4.6
  # Optional engine (--engines ...,onnxruntime); not needed otherwise.
  "$venv/bin/pip" install -q onnxruntime==1.32.0 onnx==1.23.2 || echo "onnxruntime not installed (optional)" >&2
  echo "venv ready: $venv" >&2
  [ $# -eq 0 ] && exit 0
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$venv/bin/python" ]; then
    python=$venv/bin/python
  else
    python=python3
  fi
fi
cd "$repo"
exec "$python" scripts/bench_cpu_compare.py "$@"
