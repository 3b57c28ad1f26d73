#!/usr/bin/env python3
"""Time the PyTorch side of issue #7's comparisons on this machine, for `zsad bench` to be set
against: transformers' CLIP towers with random weights of the real shapes, 2 threads by default.

Prints one JSON object (and writes it to --out when given):
  vit_l14_518   one plain CLIPVisionModel forward, ViT-L/14-336 weights at 518 px (position
                embedding interpolated), f32 and bf16 autocast
  vit_b16_224   the same for ViT-B/16 at 224 px
  text_l14      the ViT-L/14 text tower over 48 sentences (AdaCLIP's per-image count), 77 tokens
  matmul        1024x1024 @ 1024x4096 GFLOP/s, f32 and bf16
Each figure is the median of --repeats runs after one warm-up.

    pip install torch transformers
    python scripts/time_pytorch.py --threads 2 --out pytorch_times.json
"""
import argparse
import json
import platform
import statistics
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

VISION = {
    # name: (hidden, layers, heads, mlp, patch, native image size)
    "ViT-L-14-336": (1024, 24, 16, 4096, 14, 336),
    "ViT-B-16": (768, 12, 12, 3072, 16, 224),
}


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def vision_model(arch):
    width, layers, heads, mlp, patch, size = VISION[arch]
    cfg = CLIPVisionConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=mlp, patch_size=patch, image_size=size,
                           hidden_act="quick_gelu", attn_implementation="sdpa")
    torch.manual_seed(0)
    return CLIPVisionModel(cfg).eval()


def time_vision(arch, image_size, repeats):
    model = vision_model(arch)
    px = torch.randn(1, 3, image_size, image_size)
    out = {}
    with torch.inference_mode():
        interp = image_size != VISION[arch][5]
        run = lambda: model(pixel_values=px, interpolate_pos_encoding=interp)
        out["f32_s"] = timed(run, repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["bf16_autocast_s"] = timed(run, repeats)
    width, layers, _, mlp, patch, _ = VISION[arch]
    tokens = (image_size // patch) ** 2 + 1
    flops = layers * (2 * tokens * width * (4 * width + 2 * mlp) + 4 * tokens * tokens * width)
    out["gflop"] = flops / 1e9
    return out


def time_text(repeats, sentences=48, length=77):
    cfg = CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=77,
                         hidden_act="quick_gelu", attn_implementation="sdpa")
    torch.manual_seed(0)
    model = CLIPTextModel(cfg).eval()
    ids = torch.randint(1, 49405, (sentences, length))
    ids[:, -1] = 49407
    with torch.inference_mode():
        return {"sentences": sentences, "tokens": length,
                "f32_s": timed(lambda: model(input_ids=ids), repeats)}


def time_matmul(repeats):
    a, b = torch.randn(1024, 1024), torch.randn(1024, 4096)
    flop = 2 * 1024 * 1024 * 4096
    out = {"f32_gflops": flop / timed(lambda: a @ b, repeats * 5) / 1e9}
    a16, b16 = a.bfloat16(), b.bfloat16()
    out["bf16_gflops"] = flop / timed(lambda: a16 @ b16, repeats * 5) / 1e9
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true", help="skip ViT-L/14 at 518 (slow)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "matmul": time_matmul(args.repeats),
        "vit_b16_224": time_vision("ViT-B-16", 224, args.repeats),
        "text_l14": time_text(args.repeats),
    }
    if not args.skip_large:
        result["vit_l14_518"] = time_vision("ViT-L-14-336", 518, args.repeats)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
