#!/usr/bin/env bash
# The cost of --reference per test image against bank size: `zsad bench` with 0, 1, 4, 16 and
# 64 reference images at ViT-B/16 (224 px) and ViT-L/14-336 (518 px), random weights of the
# real shapes (timings do not depend on the weights). Prints one JSON line per run and a
# Markdown table at the end (the README's "Reference images" table).
#
#   scripts/bench_reference.sh [SHARED_DIR] [PRECISION]
#
# SHARED_DIR holds data/mtd (reference images) and data/mvtec_ad/bottle (test images);
# PRECISION is f32 or bf16 (default bf16: the CPU's bf16 unit where it has one).
set -euo pipefail
shared=${1:-../shared}
precision=${2:-bf16}
zsad=${ZSAD:-target/release/zsad}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/test"
for i in 000 001 002; do
  cp "$shared/data/mvtec_ad/bottle/test/broken_large/$i.png" "$work/test/$i.png"
done
mapfile -t refs < <(ls "$shared"/data/mtd/MT_Free/Imgs/*.jpg | head -64)

rows=()
for spec in "random:ViT-B-16 224" "random:ViT-L-14-336 518"; do
  set -- $spec
  model=$1 size=$2
  for k in 0 1 4 16 64; do
    args=(bench --model "$model" --image-size "$size" --precision "$precision"
      --images "$work/test" --maps none --heatmaps none --json)
    if [ "$k" -gt 0 ]; then
      args+=(--reference "${refs[@]:0:$k}")
    fi
    line=$("$zsad" "${args[@]}")
    echo "$line"
    rows+=("$(python3 -c '
import json, sys
v = json.loads(sys.argv[1]); k = int(sys.argv[2]); b = v.get("reference_bank") or {}
s = v["stages"]
print("| %s @ %d | %d | %s | %.1f | %.3f | %.4f | %.0f |" % (
    v["model"].split(":")[1], v["image_size"], k,
    b.get("patches_per_layer", "-"), b.get("megabytes", 0.0),
    v["seconds_per_image"], s["reference"], b.get("build_seconds", 0.0)))
' "$line" "$k")")
  done
done
echo
echo "| model | references | bank patches per layer | bank MB | s per image | of which search | bank build s |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
