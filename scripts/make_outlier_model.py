#!/usr/bin/env python3
"""A random CLIP ViT-B/16 in the Hugging Face layout whose GEMM inputs carry trained-CLIP-like
activation outliers: in every block, four channels of both LayerNorm gains scaled by 20, 30, 40
and 50, so those channels of every q/k/v and MLP input are 20-50x larger than the rest. For
measuring what `--precision bf16` costs where bf16 rounding hurts most (README, bf16 section):

    pip install torch transformers safetensors
    python scripts/make_outlier_model.py /tmp/outlier-b16
    zsad detect --model /tmp/outlier-b16 --preset zero-shot --maps npy ... [--precision bf16]

Nothing is downloaded; the tokenizer is zsad's embedded CLIP vocabulary.
"""
import sys

import torch
from transformers import CLIPConfig, CLIPModel


def main():
    out = sys.argv[1]
    cfg = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                         num_hidden_layers=12, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                           num_hidden_layers=12, patch_size=16, image_size=224,
                           hidden_act="quick_gelu"),
        projection_dim=512,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([20.0, 30.0, 40.0, 50.0])
    with torch.no_grad():
        for tower in (model.vision_model, model.text_model):
            channels = torch.randperm(tower.config.hidden_size, generator=g)[:4]
            for layer in tower.encoder.layers:
                layer.layer_norm1.weight[channels] *= scale
                layer.layer_norm2.weight[channels] *= scale
    model.save_pretrained(out, safe_serialization=True)
    print(f"wrote {out} (outlier channels x20-50 in every LayerNorm gain)")


if __name__ == "__main__":
    main()
