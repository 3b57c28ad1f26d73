#!/usr/bin/env bash
# The GPU checks of the CUDA path, as one prepared run for a machine with an NVIDIA GPU (the
# `device` tool's H200: 15 minutes in all, start included), from binaries built here.
#
#   eval "$(scripts/cuda-toolkit.sh)"     # here, once: CUDA 13.0's compiler from PyPI
#   scripts/gpu_check.sh pack             # here: builds zsad and the CUDA test binaries with
#                                         # --features cuda, strips and packs them into gpu-kit/
#                                         # (ignored by git; carry it: `carry: ["gpu-kit"]`)
#   scripts/gpu_check.sh run              # there: every check below, the report in
#                                         # $OUT/gpu-check.txt (or ./gpu-check.txt)
#   scripts/gpu_check.sh run --smoke      # here: the same steps on the CPU with random:tiny, to
#                                         # check the script itself before device time is spent
#
# What `run` measures (issue 17):
#   1. the CUDA parity tests: the frozen-backbone ops against the CPU in f32/f16/bf16
#      (clip::frozen_op::tests::cuda_matches_the_cpu) and the finite-difference gradients of
#      every adapter kind on the GPU (tests/gradients.rs cuda_gradients);
#   2. detect on the GPU against the CPU, maps and scores, ViT-B/16 random weights: f32 within
#      1e-4, --precision bf16 (autocast) within 1e-2, --dtype bf16 (the whole model) for
#      information (max abs difference printed either way);
#   3. training steps of adaclip and headclip at ViT-L/14-336 @ 518, batch 1, with the GPU's
#      peak memory (nvidia-smi polled every 0.1 s);
#   4. zsad bench at ViT-B/16 @ 224 and ViT-L/14-336 @ 518, f32 and bf16, images per second
#      (32 images, --batch-size 0: as many per pass as the GPU's free memory holds), with the
#      seconds of each stage one after another;
#   5. `zsad detect` over 64 images, the whole overlapped pipeline (`throughput` runs this step
#      alone).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kit=$repo/gpu-kit

pack() {
  set -e
  cd "$repo"
  command -v nvcc >/dev/null || { echo "nvcc not found: eval \"\$(scripts/cuda-toolkit.sh)\" first" >&2; exit 2; }
  rm -rf "$kit" && mkdir -p "$kit"
  # Its own target folder: the CPU build in target/release stays as it is.
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/cuda}
  cargo build --release --features cuda
  # The test executables cargo builds, by name.
  cargo test --release --features cuda --lib --test gradients --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' > "$kit/tests.txt"
  strip -o "$kit/zsad" "$CARGO_TARGET_DIR/release/zsad"
  gzip -9 "$kit/zsad"
  while read -r name exe; do
    strip -o "$kit/test-$name" "$exe"
    gzip -9 "$kit/test-$name"
  done < "$kit/tests.txt"
  du -sh "$kit"
}

run() {
  local smoke=${1:-}
  local out=${OUT:-$PWD}
  local report=$out/gpu-check.txt
  local work=/tmp/zsad-gpu-check
  rm -rf "$work" && mkdir -p "$work"
  exec > >(tee "$report") 2>&1
  local zsad dev vitb vitl
  if [ "$smoke" = --smoke ]; then
    zsad=$repo/target/release/zsad dev=cpu vitb=random:tiny vitl=random:tiny
  else
    for f in "$kit"/*.gz; do gunzip -c "$f" > "$work/$(basename "$f" .gz)"; done
    chmod +x "$work"/zsad "$work"/test-*
    zsad=$work/zsad dev=cuda vitb=random:ViT-B-16 vitl=random:ViT-L-14-336
    # CUDA 13's cuBLAS, cuRAND and runtime: PyTorch's `nvidia-*` wheels carry them there.
    local libs
    libs=$(python3 -c 'import glob, nvidia; print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(p + "/*/lib")})))' 2>/dev/null)
    export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$zsad" --version || { echo "zsad does not start: ldd says"; ldd "$zsad" | grep -i "not found"; }
  fi
  echo "== 1. parity tests on the GPU"
  if [ "$smoke" != --smoke ]; then
    timeout 120 "$work"/test-zsad clip::frozen_op::tests::cuda_matches_the_cpu --nocapture 2>&1 | grep -v "^\s*[0-9]*: \|^\s*at " | tail -25
    timeout 180 "$work"/test-gradients cuda_gradients --nocapture 2>&1 | grep -v "^\s*[0-9]*: \|^\s*at " | tail -25
  fi
  echo "== images"
  python3 - "$work" <<'PY'
import sys, os
import numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(0)
os.makedirs(f"{root}/img", exist_ok=True)
os.makedirs(f"{root}/train/part", exist_ok=True)
for i in range(8):
    a = (rng.random((900, 900, 3)) * 255).astype("uint8")
    a[300:420, 500:640] = [230, 40, 30]
    Image.fromarray(a).save(f"{root}/img/{i:03}.png")
for i in range(4):
    a = (rng.random((518, 518, 3)) * 255).astype("uint8")
    m = np.zeros((518, 518), "uint8")
    if i % 2:
        a[100:180, 200:300] = [30, 60, 220]; m[100:180, 200:300] = 255
    Image.fromarray(a).save(f"{root}/train/part/{i:03}.png")
    Image.fromarray(m).save(f"{root}/train/part/{i:03}_mask.png")
print("8 test images 900x900, 4 training images 518x518")
PY
  echo "== 2. detect: $dev against the CPU ($vitb, maps as .npy)"
  timeout 120 "$zsad" detect "$work/img" --model "$vitb" --device cpu --maps npy --heatmaps none -q --out "$work/cpu"
  timeout 120 "$zsad" detect "$work/img" --model "$vitb" --device "$dev" --maps npy --heatmaps none -q --out "$work/gpu32"
  timeout 120 "$zsad" detect "$work/img" --model "$vitb" --device "$dev" --precision bf16 --maps npy --heatmaps none -q --out "$work/gpu16"
  [ "$smoke" != --smoke ] && timeout 120 "$zsad" detect "$work/img" --model "$vitb" --device "$dev" --dtype bf16 --maps npy --heatmaps none -q --out "$work/gpubf16"
  python3 - "$work" <<'PY'
import json, sys
import numpy as np
root = sys.argv[1]
def load(d):
    recs = {json.loads(l)["path"]: json.loads(l) for l in open(f"{root}/{d}/scores.jsonl")}
    return recs
cpu = load("cpu")
import os
for run, tol in (("gpu32", 1e-4), ("gpu16", 1e-2), ("gpubf16", None)):
    if not os.path.exists(f"{root}/{run}/scores.jsonl"):
        continue
    other = load(run)
    dmap = max(np.abs(np.load(f"{root}/cpu/{r['map']}") - np.load(f"{root}/{run}/{other[p]['map']}")).max() for p, r in cpu.items())
    dscore = max(abs(r["score"] - other[p]["score"]) for p, r in cpu.items())
    what = {"gpu32": "f32", "gpu16": "--precision bf16 (autocast)", "gpubf16": "--dtype bf16 (whole model)"}[run]
    verdict = "for information" if tol is None else ("ok" if max(dmap, dscore) <= tol else "OVER") + f" (tolerance {tol:g})"
    print(f"{what}: maps max abs diff {dmap:.2e}, scores {dscore:.2e}: {verdict}")
PY
  local train_size=518
  [ "$smoke" = --smoke ] && train_size=32
  echo "== 3. training steps at $vitl @ $train_size, batch 1, peak GPU memory"
  for preset in adaclip headclip; do
    local peak=$work/peak-$preset
    if [ "$smoke" != --smoke ]; then
      ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.1; done ) > "$peak" &
      local poll=$!
    fi
    local t0=$EPOCHREALTIME
    timeout 150 "$zsad" train --data "$work/train" --model "$vitl" \
      --preset "$preset" --image-size "$train_size" --batch-size 1 --max-steps 4 --device "$dev" \
      --out "$work/$preset.safetensors" 2>&1 | grep -E "steps in|error"
    echo "$preset: $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}") s wall for the model's load and the steps"
    if [ "$smoke" != --smoke ]; then
      kill "$poll" 2>/dev/null
      echo "$preset: peak GPU memory $(sort -n "$peak" | tail -1) MiB (whole card, zsad alone on it)"
    fi
  done
  echo "== 4. zsad bench"
  for model in "$vitb" "$vitl"; do
    local size=224
    [ "$model" = "$vitl" ] && size=518
    [ "$smoke" = --smoke ] && size=32
    for prec in f32 bf16; do
      local json
      if json=$(timeout 120 "$zsad" bench --model "$model" --image-size "$size" --device "$dev" \
        --precision "$prec" --images "$work/img" --runs 4 --batch-size 0 --json 2>"$work/bench.err"); then
        python3 -c "import json,sys; j=json.loads(sys.argv[1]); print('$model @ $size $prec: %.4f s/image, %.2f images/s, gemm %s, peak RSS %.0f MB; per image: %s' % (j['seconds_per_image'], j['images_per_second'], j.get('gemm'), j.get('peak_rss_mb') or 0, ', '.join('%s %.1f ms' % (k, 1000 * v) for k, v in j['stages'].items() if v)))" "$json"
      else
        echo "$model @ $size $prec: bench failed: $(tail -2 "$work/bench.err")"
      fi
    done
  done
  throughput_step "$zsad" "$dev" "$vitb" "$vitl" "$work" "$smoke"
  echo "report: $report"
}

# 5. What a user gets: `zsad detect` over 64 images (900x900 PNG, maps and overlays written),
#    the whole overlapped pipeline, --batch-size 0 (sized for the GPU).
throughput_step() {
  local zsad=$1 dev=$2 vitb=$3 vitl=$4 work=$5 smoke=$6
  echo "== 5. zsad detect throughput, 64 images, maps and overlay heatmaps written"
  python3 - "$work" <<'PY'
import sys, os
import numpy as np
from PIL import Image
root = sys.argv[1]
os.makedirs(f"{root}/many", exist_ok=True)
rng = np.random.default_rng(1)
base = (rng.random((900, 900, 3)) * 255).astype("uint8")
for i in range(64):
    a = np.roll(base, i * 7, axis=1)
    Image.fromarray(a).save(f"{root}/many/{i:03}.png", compress_level=1)
PY
  local size
  for model in "$vitb" "$vitl"; do
    size=224
    [ "$model" = "$vitl" ] && size=518
    [ "$smoke" = --smoke ] && size=32
    for prec in f32 bf16; do
      rm -rf "$work/tp"
      timeout 150 "$zsad" detect "$work/many" --model "$model" --image-size "$size" --device "$dev" \
        --precision "$prec" --out "$work/tp" 2>&1 | grep -E "scored|error" | sed "s|^|$model @ $size $prec: |"
    done
  done
}

throughput() {
  local out=${OUT:-$PWD} work=/tmp/zsad-gpu-check
  mkdir -p "$work"
  exec > >(tee "$out/gpu-throughput.txt") 2>&1
  for f in "$kit"/zsad.gz; do gunzip -c "$f" > "$work/zsad"; done
  chmod +x "$work/zsad"
  export LD_LIBRARY_PATH=$(python3 -c 'import glob, nvidia; print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(p + "/*/lib")})))' 2>/dev/null):${LD_LIBRARY_PATH:-}
  nproc
  throughput_step "$work/zsad" cuda random:ViT-B-16 random:ViT-L-14-336 "$work" ""
}

case ${1:-} in
pack) pack ;;
run) shift; run "$@" ;;
throughput) throughput ;;
*) echo "usage: scripts/gpu_check.sh pack | run [--smoke] | throughput" >&2; exit 2 ;;
esac
