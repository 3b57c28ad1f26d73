#!/usr/bin/env python3
"""Writes the reference fixtures under tests/fixtures/ that the Rust parity tests compare against.

Reference implementations: Hugging Face `transformers.CLIPModel` (eager attention, CPU, f32),
`torch.nn.functional.interpolate`, PIL `Image.resize`, and the slow `CLIPTokenizer` (OpenAI's BPE
algorithm with ftfy).

What it writes:
  models/<name>/config.json + model.safetensors   tiny random CLIP models in the HF layout
  models/tiny-vitb-openai/open_clip_model.safetensors   the tiny-vitb weights, OpenAI/open_clip names
  models/tiny-gelu-openai/open_clip_pytorch_model.bin   the tiny-gelu weights, OpenAI names, torch pickle
  <name>.expected.safetensors   inputs (token ids) and HF outputs: image/text embeds, hidden states
  preprocess/*.png + preprocess.expected.safetensors   PIL resize outputs
  tokens.json                   strings and their CLIP token ids

Weights are drawn in f32, then rounded to f16-representable values and stored as f16, so the files
stay small while the f32 model that produced the expected outputs is bit-identical to what the
Rust side loads (f16 -> f32 is exact).

Pixel inputs are not stored: both sides compute x[n,c,h,w] = ((7n+13c+17h+31w) mod 97) / 48.5 - 1
in f32.

Usage: python3 scripts/make_fixtures.py   (needs torch, transformers, safetensors, pillow, numpy,
ftfy; reads ../shared/clip-tokenizer and ../shared/data when present)
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
SHARED = ROOT.parent / "shared"


def pixels(n, size):
    idx = np.indices((n, 3, size, size))
    k = (7 * idx[0] + 13 * idx[1] + 17 * idx[2] + 31 * idx[3]) % 97
    return torch.from_numpy(k.astype(np.float32) / np.float32(48.5) - np.float32(1.0))


def make_config(vision, text, proj, act, eos):
    return CLIPConfig(
        text_config=dict(text, hidden_act=act, eos_token_id=eos, max_position_embeddings=77, layer_norm_eps=1e-5),
        vision_config=dict(vision, hidden_act=act, num_channels=3, layer_norm_eps=1e-5),
        projection_dim=proj,
    )


def build(cfg, seed):
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    # HF initialises LayerNorms to (1, 0) and biases to 0: randomise everything so that every
    # weight is exercised, then round to f16-representable values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif "class_embedding" in name or "position_embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif "token_embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif name != "logit_scale":
                fan_in = p.shape[1] if p.dim() == 2 else p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
            p.copy_(p.half().float())
    return model


def state_dict_f16(model):
    return {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}


def to_openai(sd, cfg):
    """Hugging Face names -> OpenAI/open_clip names (independent of the Rust name table)."""
    o = {}
    o["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    o["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    o["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    for a, b in [("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")]:
        for w in ["weight", "bias"]:
            o[f"visual.{b}.{w}"] = sd[f"vision_model.{a}.{w}"]
    o["visual.proj"] = sd["visual_projection.weight"].t()
    o["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    o["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    for w in ["weight", "bias"]:
        o[f"ln_final.{w}"] = sd[f"text_model.final_layer_norm.{w}"]
    o["text_projection"] = sd["text_projection.weight"].t()
    o["logit_scale"] = sd["logit_scale"]
    towers = [
        ("vision_model.encoder.layers", "visual.transformer.resblocks", cfg.vision_config.num_hidden_layers),
        ("text_model.encoder.layers", "transformer.resblocks", cfg.text_config.num_hidden_layers),
    ]
    for hf, oa, n in towers:
        for i in range(n):
            h, q = f"{hf}.{i}.", f"{oa}.{i}."
            for w in ["weight", "bias"]:
                o[q + f"attn.in_proj_{w}"] = torch.cat([sd[h + f"self_attn.{p}_proj.{w}"] for p in "qkv"], 0)
                o[q + f"attn.out_proj.{w}"] = sd[h + f"self_attn.out_proj.{w}"]
                o[q + f"ln_1.{w}"] = sd[h + f"layer_norm1.{w}"]
                o[q + f"ln_2.{w}"] = sd[h + f"layer_norm2.{w}"]
                o[q + f"mlp.c_fc.{w}"] = sd[h + f"mlp.fc1.{w}"]
                o[q + f"mlp.c_proj.{w}"] = sd[h + f"mlp.fc2.{w}"]
    return {k: v.contiguous().clone() for k, v in o.items()}


def save_model(model, name):
    d = OUT / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_file(state_dict_f16(model), str(d / "model.safetensors"))
    return d


@torch.no_grad()
def reference_outputs(model, ids, n_images, size, interpolate=False):
    px = pixels(n_images, size)
    v = model.vision_model(pixel_values=px, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    out = {"image_embeds": model.visual_projection(v.pooler_output)}
    for i, h in enumerate(v.hidden_states):
        out[f"vision_hidden_{i}"] = h
    if ids is not None:
        t = model.text_model(input_ids=ids, output_hidden_states=True)
        out["text_embeds"] = model.text_projection(t.pooler_output)
        out["input_ids"] = ids
        for i, h in enumerate(t.hidden_states):
            out[f"text_hidden_{i}"] = h
    return out


def pad(seqs, n=77):
    return torch.tensor([s + [0] * (n - len(s)) for s in seqs], dtype=torch.int64)


def models():
    rng = np.random.default_rng(0)
    tiny_vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       image_size=32, patch_size=8)

    # 1. QuickGELU, real CLIP vocabulary (the real tokenizer's ids), legacy eos_token_id=2 (argmax).
    cfg = make_config(tiny_vision, dict(vocab_size=49408, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2), 24, "quick_gelu", 2)
    m = build(cfg, 1)
    save_model(m, "tiny-quickgelu")
    tok = CLIPTokenizer(str(SHARED / "clip-tokenizer" / "vocab.json"), str(SHARED / "clip-tokenizer" / "merges.txt"))
    texts = ["a photo of a cat", "a bad photo of a damaged bottle.", "flawless object"]
    ids = pad([tok(t)["input_ids"] for t in texts])
    out = reference_outputs(m, ids, 2, 32)
    # The whole `zsad features` pipeline on a real file: PIL bicubic to 32 px, ToTensor, CLIP mean/std.
    img = Image.open(OUT / "preprocess" / "rgb_50x37.png").convert("RGB").resize((32, 32), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    with torch.no_grad():
        v = m.vision_model(pixel_values=((x - mean) / std)[None])
        out["file_image_embeds"] = m.visual_projection(v.pooler_output)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "tiny-quickgelu.expected.safetensors"),
              metadata={"texts": json.dumps(texts)})

    # 2. exact GELU, small vocabulary, eos_token_id=999 (first-occurrence pooling), run at 48 px
    #    with the position embedding interpolated (bicubic), plus bilinear/bicubic pos fixtures.
    cfg = make_config(tiny_vision, dict(vocab_size=1000, hidden_size=24, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=3), 20, "gelu", 999)
    m = build(cfg, 2)
    save_model(m, "tiny-gelu")
    seqs = [[998] + list(rng.integers(1, 998, size=n)) + [999] for n in (3, 9, 5)]
    seqs[1] = seqs[1] + [999]  # a second EOT after the first: pooling must take the first
    ids = pad([[int(x) for x in s] for s in seqs])
    out = reference_outputs(m, ids, 2, 32)
    at48 = reference_outputs(m, None, 2, 48, interpolate=True)
    out.update({f"{k}@48": v for k, v in at48.items()})
    pos = m.vision_model.embeddings.position_embedding.weight.detach()
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    for mode in ["bilinear", "bicubic"]:
        r = F.interpolate(grid, size=(7, 7), mode=mode, align_corners=False)
        out[f"pos_{mode}_7"] = torch.cat([pos[:1], r.permute(0, 2, 3, 1).reshape(49, -1)], 0)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "tiny-gelu.expected.safetensors"))
    d = OUT / "models" / "tiny-gelu-openai"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(to_openai(state_dict_f16(m), cfg), str(d / "open_clip_pytorch_model.bin"))

    # 3. ViT-B-shaped: 224 px, 16 px patches (14x14 grid), 64-wide heads; legacy argmax pooling.
    cfg = make_config(dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=16),
                      dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=1), 32, "quick_gelu", 2)
    m = build(cfg, 3)
    save_model(m, "tiny-vitb")
    seqs = [[998] + [int(x) for x in rng.integers(1, 998, size=n)] + [999] for n in (4, 11)]
    out = reference_outputs(m, pad(seqs), 2, 224)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "tiny-vitb.expected.safetensors"))
    d = OUT / "models" / "tiny-vitb-openai"
    d.mkdir(parents=True, exist_ok=True)
    save_file(to_openai(state_dict_f16(m), cfg), str(d / "open_clip_model.safetensors"))


def preprocessing():
    d = OUT / "preprocess"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:37, 0:50]
    rgb = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.integers(0, 60, size=(37, 50, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(d / "rgb_50x37.png")
    rgba = rng.integers(0, 256, size=(45, 61, 4)).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "rgba_61x45.png")
    grey = (np.hypot(yy - 18, xx - 25) * 9).clip(0, 255).astype(np.uint8)
    Image.fromarray(grey, "L").save(d / "grey_50x37.png")
    mask = (((yy - 10) ** 2 + (xx - 30) ** 2 < 60) | ((yy > 25) & (xx < 12))).astype(np.uint8) * 255
    Image.fromarray(mask, "L").save(d / "mask_50x37.png")

    out = {}
    for name in ["rgb_50x37", "rgba_61x45", "grey_50x37"]:
        img = Image.open(d / f"{name}.png").convert("RGB")
        for s in (32, 24, 80):
            out[f"{name}@{s}"] = torch.from_numpy(np.asarray(img.resize((s, s), Image.BICUBIC)).copy())
    m = Image.open(d / "mask_50x37.png")
    for s in (32, 80):
        r = np.asarray(m.resize((s, s), Image.BILINEAR)).astype(np.float32) / 255.0
        out[f"mask_50x37@{s}"] = torch.from_numpy((r > 0.5).astype(np.uint8))
    real = SHARED / "data" / "mvtec_ad" / "bottle" / "test" / "broken_large" / "000.png"
    real_mask = SHARED / "data" / "mvtec_ad" / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"
    if real.exists():
        img = Image.open(real).convert("RGB")
        out["bottle_000@224"] = torch.from_numpy(np.asarray(img.resize((224, 224), Image.BICUBIC)).copy())
        r = np.asarray(Image.open(real_mask).resize((224, 224), Image.BILINEAR)).astype(np.float32) / 255.0
        out["bottle_000_mask@224"] = torch.from_numpy((r > 0.5).astype(np.uint8))
    save_file(out, str(OUT / "preprocess.expected.safetensors"))


def maps():
    """scipy.ndimage.gaussian_filter and F.interpolate(bilinear) references."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(2)
    out = {}
    m = rng.random((50, 40), dtype=np.float32)
    out["map_50x40"] = torch.from_numpy(m)
    for s in (4.0, 1.5):
        out[f"gauss_50x40_s{s}"] = torch.from_numpy(gaussian_filter(m, sigma=s))
    small = rng.random((3, 5), dtype=np.float32)  # radius 16 > size: repeated reflections
    out["map_3x5"] = torch.from_numpy(small)
    out["gauss_3x5_s4.0"] = torch.from_numpy(gaussian_filter(small, sigma=4.0))
    g = torch.from_numpy(rng.standard_normal((2, 5, 6), dtype=np.float32))
    out["grid_2x5x6"] = g
    for ac in (True, False):
        out[f"up_13x17_ac{int(ac)}"] = F.interpolate(g[None], size=(13, 17), mode="bilinear", align_corners=ac)[0]
    save_file(out, str(OUT / "maps.expected.safetensors"))


def tokens():
    tok = CLIPTokenizer(str(SHARED / "clip-tokenizer" / "vocab.json"), str(SHARED / "clip-tokenizer" / "merges.txt"))
    strings = [
        "a photo of a cat",
        "a cropped photo of the metal_nut.",
        "Flawless PCB1 without DEFECT!!",
        "  multiple   spaces\tand\nnewlines ",
        "unicode: café naïve 東京 🙂",
        "it's a test, isn't it? we'll see",
        "123 4567 3.14 1e-5",
        "a damaged zipper with flaw",
        "<|startoftext|> inside text",
    ]
    out = [{"text": s, "ids": tok(s)["input_ids"]} for s in strings]
    (OUT / "tokens.json").write_text(json.dumps(out, indent=1, ensure_ascii=False))


def main():
    torch.set_num_threads(2)
    if not (SHARED / "clip-tokenizer").exists():
        sys.exit(f"{SHARED / 'clip-tokenizer'} is needed")
    OUT.mkdir(parents=True, exist_ok=True)
    preprocessing()
    models()
    maps()
    tokens()
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
