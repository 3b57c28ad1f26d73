#!/usr/bin/env python3
"""Reference fixtures for the method-level parity tests: AdaCLIP, AnomalyCLIP and HeadCLIP forwards on a tiny
random CLIP (reference code: caoyunkang/AdaCLIP@e27ee32, zqhang/AnomalyCLIP@45ed4dd).

This is an independent, from-scratch re-implementation of the inference forwards of
  * AdaCLIP      (caoyunkang/AdaCLIP: method/adaclip.py, method/transformer.py, method/clip_model.py),
  * AnomalyCLIP  (zqhang/AnomalyCLIP: AnomalyCLIP_lib/AnomalyCLIP.py, prompt_ensemble.py, test.py), with the
                 multi-layer bug FIXED (commit 2a7c886: each requested layer gives its own map),
  * HeadCLIP     (our design after the arXiv 2505.22259 abstract, whose code is not public: AnomalyCLIP +
                 learnable per-layer, per-head attention weights),
written on plain torch ops (CPU, f32, no autocast). The CLIP towers are checked against
`transformers.CLIPModel` in `self_check()` before anything is written.

What it writes (under tests/fixtures/):
  models/tiny-method/{config.json,model.safetensors}  tiny random HF-layout CLIP, built by make_fixtures.build
        (vision 32 wide, 4 layers, 2 heads, MLP 64, 32 px / patch 8; text 16 wide, 4 layers, 2 heads, MLP 32,
        real CLIP vocabulary 49408, eos_token_id 2 (argmax pooling); projection 24; config act quick_gelu)
  adaclip_tiny.pth          torch.save(dict) with the AdaCLIP key names (method/trainer.py l.89-98), fp32, Linear [out, in]
  anomalyclip_tiny.pth      torch.save({"prompt_learner": {...}}) with AnomalyCLIP's prompt-learner keys
  methods.expected.safetensors   expected tensors (f32; token ids int64), keys `adaclip.*`, `anomalyclip.*`,
        `headclip.*` (listed in the case functions below)

Conventions (shared with the Rust side):
  * Input: make_fixtures.pixels(1, 64) (already normalised), model run at 64 px -> 8x8 grid = 64 patches.
  * Position embeddings 4x4 -> 8x8, CLS row kept: AdaCLIP F.interpolate bicubic, align_corners=False (no
    antialias), done once; AnomalyCLIP/HeadCLIP bilinear, align_corners=False.
  * Activation: AdaCLIP exact erf GELU (both towers; overrides the config's quick_gelu), AnomalyCLIP/HeadCLIP
    QuickGELU.
  * Layer numbering: 1-based block outputs (layer l = residual stream after block l = HF hidden_states[l]).
  * Tokens: real CLIP tokenizer (../shared/clip-tokenizer), [49406] + bpe + [49407], zero-padded to 77;
    EOT pooling = argmax of the ids.
  * Every learnable method tensor is drawn in f32 from a fixed seed and rounded to f16-representable values,
    so the .pth files store exactly what both sides compute with.
  * AdaCLIP's `.half()` on prompts (PromptLayer): the prompt tokens (static + dynamic, summed in f32) are rounded
    to f16 and back right before they enter the stream, in both encoders; everything else is f32.
  * AdaCLIP final map: (p_a + 1 - p_n) / 2 after the 2-channel softmax, as adaclip.py computes it (= p_a up to
    one f32 rounding).
  * Gaussian: scipy.ndimage.gaussian_filter(map, sigma=4) (mode reflect, truncate 4) on the 64x64 f32 map.
  * Attention: q scaled by head_dim^-0.5 before q.kT (nn.MultiheadAttention order); the V-V path uses the same
    in_proj rows and out_proj (with bias).

Usage: /work/venv/bin/python scripts/make_method_fixtures.py   (torch, transformers, safetensors, numpy, scipy,
sklearn; imports make_fixtures.py from this folder, which has no side effects on import)
"""
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy.ndimage import gaussian_filter
from transformers import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

OUT = mf.OUT
SHARED = mf.SHARED
IMAGE_SIZE = 64
GRID = 8
MODEL_SEED = 7
EXPECTED = {}  # name -> tensor, written to methods.expected.safetensors


def f16(t):
    return t.half().float()


# --------------------------------------------------------------------------------------------------
# Weights: read the HF model into OpenAI-style plain tensors (packed in_proj = [q; k; v], proj = W^T)


def block_params(sd, prefix):
    g = lambda k: sd[prefix + k].detach().clone()  # noqa: E731
    return dict(
        in_w=torch.cat([g(f"self_attn.{p}_proj.weight") for p in "qkv"], 0),
        in_b=torch.cat([g(f"self_attn.{p}_proj.bias") for p in "qkv"], 0),
        out_w=g("self_attn.out_proj.weight"), out_b=g("self_attn.out_proj.bias"),
        ln1_w=g("layer_norm1.weight"), ln1_b=g("layer_norm1.bias"),
        ln2_w=g("layer_norm2.weight"), ln2_b=g("layer_norm2.bias"),
        fc_w=g("mlp.fc1.weight"), fc_b=g("mlp.fc1.bias"),
        pr_w=g("mlp.fc2.weight"), pr_b=g("mlp.fc2.bias"),
    )


def clip_params(model):
    sd = model.state_dict()
    c = model.config
    v, t = c.vision_config, c.text_config
    P = dict(
        v_heads=v.num_attention_heads, t_heads=t.num_attention_heads, patch=v.patch_size,
        conv_w=sd["vision_model.embeddings.patch_embedding.weight"].clone(),
        cls=sd["vision_model.embeddings.class_embedding"].clone(),
        v_pos=sd["vision_model.embeddings.position_embedding.weight"].clone(),
        ln_pre=(sd["vision_model.pre_layrnorm.weight"], sd["vision_model.pre_layrnorm.bias"]),
        ln_post=(sd["vision_model.post_layernorm.weight"], sd["vision_model.post_layernorm.bias"]),
        v_proj=sd["visual_projection.weight"].t().clone(),
        v_blocks=[block_params(sd, f"vision_model.encoder.layers.{i}.") for i in range(v.num_hidden_layers)],
        tok_emb=sd["text_model.embeddings.token_embedding.weight"].clone(),
        t_pos=sd["text_model.embeddings.position_embedding.weight"].clone(),
        ln_final=(sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"]),
        t_proj=sd["text_projection.weight"].t().clone(),
        t_blocks=[block_params(sd, f"text_model.encoder.layers.{i}.") for i in range(t.num_hidden_layers)],
    )
    return P


# --------------------------------------------------------------------------------------------------
# Building blocks (x is [N, L, D] throughout)


def ln(x, wb):
    return F.layer_norm(x, (x.shape[-1],), wb[0], wb[1], 1e-5)


def activation(x, kind):
    if kind == "gelu":
        return F.gelu(x)  # exact erf
    assert kind == "quick_gelu"
    return x * torch.sigmoid(1.702 * x)


def mlp(x, p, act):
    return activation(x @ p["fc_w"].t() + p["fc_b"], act) @ p["pr_w"].t() + p["pr_b"]


def split_heads(t, heads):
    n, l, d = t.shape
    return t.reshape(n, l, heads, d // heads).transpose(1, 2)  # [N, H, L, hd]


def attention_heads(h, p, heads, mask=None, vv=False):
    """Per-head outputs before concatenation/out_proj: (ori [N,H,L,hd], vv [N,H,L,hd] or None)."""
    d = h.shape[-1]
    qkv = h @ p["in_w"].t() + p["in_b"]
    q, k, v = (split_heads(t, heads) for t in qkv.split(d, dim=-1))
    scale = (d // heads) ** -0.5
    a = (q * scale) @ k.transpose(-1, -2)
    if mask is not None:
        a = a + mask
    ori = a.softmax(-1) @ v
    out_vv = None
    if vv:
        out_vv = ((v * scale) @ v.transpose(-1, -2)).softmax(-1) @ v
    return ori, out_vv


def merge_heads(o, p, head_w=None):
    n, hh, l, hd = o.shape
    if head_w is not None:
        o = o * head_w.view(1, hh, 1, 1)
    return o.transpose(1, 2).reshape(n, l, hh * hd) @ p["out_w"].t() + p["out_b"]


def block(x, p, heads, act, mask=None, head_w=None):
    ori, _ = attention_heads(ln(x, (p["ln1_w"], p["ln1_b"])), p, heads, mask)
    x = x + merge_heads(ori, p, head_w)
    return x + mlp(ln(x, (p["ln2_w"], p["ln2_b"])), p, act)


def causal_mask(n):
    return torch.full((n, n), float("-inf")).triu(1)


def resize_pos(pos, grid, mode):
    old = int(round((pos.shape[0] - 1) ** 0.5))
    d = pos.shape[1]
    img = pos[1:].reshape(1, old, old, d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode=mode, align_corners=False)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, d)], 0)


def vision_embed(P, px, pos):
    x = F.conv2d(px, P["conv_w"], stride=P["patch"])  # [N, D, g, g]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([P["cls"].expand(x.shape[0], 1, -1), x], 1) + pos
    return ln(x, P["ln_pre"])


def text_pool(P, x, ids):
    x = ln(x, P["ln_final"])
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ P["t_proj"]


def plain_text(P, ids, act):
    x = P["tok_emb"][ids] + P["t_pos"]
    hs = [x]
    for p in P["t_blocks"]:
        x = block(x, p, P["t_heads"], act, causal_mask(ids.shape[1]))
        hs.append(x)
    return text_pool(P, x, ids), hs


def plain_vision(P, px, pos, act):
    x = vision_embed(P, px, pos)
    hs = [x]
    for p in P["v_blocks"]:
        x = block(x, p, P["v_heads"], act)
        hs.append(x)
    return ln(x[:, 0], P["ln_post"]) @ P["v_proj"], hs


# --------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer():
    d = SHARED / "clip-tokenizer"
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


def tokenize(tok, texts):
    seqs = [tok(t)["input_ids"] for t in texts]
    assert all(s[0] == 49406 and s[-1] == 49407 for s in seqs)
    return mf.pad(seqs)


# --------------------------------------------------------------------------------------------------
# AdaCLIP


ADA_J, ADA_M, ADA_LAYERS, ADA_K = 3, 2, [1, 2, 3, 4], 1
NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage"]
ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = ["a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}."]


def ada_sentences(states, cls):
    return [t.format(s.format(cls)) for s in states for t in TEMPLATES]  # state outer, template inner


def linear_f16(n_in, n_out, scale=1.0):
    lin = torch.nn.Linear(n_in, n_out)  # PyTorch default init from the global RNG
    with torch.no_grad():
        w = f16(lin.weight * scale)
        b = f16(lin.bias.clone())
    return w, b


def adaclip_params(d_vis, d_txt, d_proj, seed=101):
    """AdaCLIP's checkpoint key names (method/trainer.py l.89-98 saves these state_dict entries). Static prompts N(0, 0.5); Linear layers PyTorch default init, the dynamic
    prompt generators' weights scaled x3 so that the image-dependent part matters; all f16-rounded."""
    torch.manual_seed(seed)
    d = OrderedDict()
    for i in range(ADA_J):
        d[f"clip_model.text_prompter.static_prompts.{i}"] = f16(0.5 * torch.randn(ADA_M, d_txt))
    for i in range(ADA_J):
        d[f"clip_model.visual_prompter.static_prompts.{i}"] = f16(0.5 * torch.randn(ADA_M, d_vis))
    heads = [(f"patch_token_layer.head.{i}", d_vis, d_proj, 1.0) for i in range(len(ADA_LAYERS))]
    heads += [("cls_token_layer.head.0", d_proj, d_proj, 1.0)]
    heads += [(f"dynamic_visual_prompt_generator.head.{i}", d_proj, d_vis, 3.0) for i in range(ADA_M)]
    heads += [(f"dynamic_text_prompt_generator.head.{i}", d_proj, d_txt, 3.0) for i in range(ADA_M)]
    for name, n_in, n_out, scale in heads:
        w, b = linear_f16(n_in, n_out, scale)
        d[f"clip_model.{name}.weight"], d[f"clip_model.{name}.bias"] = w, b
    return d


TEXT_W = 16


def ada_lin(A, name, x):
    return x @ A[name + ".weight"].t() + A[name + ".bias"]


def adaclip_vision_prompted(P, px, pos, vis_prompts, act, M, J, out_layers):
    """vis_prompts[i]: [M, D] (already f16-rounded) for layers i < J. Returns pooled, taps (prompt tokens dropped)."""
    x = vision_embed(P, px, pos)
    taps = []
    for i, p in enumerate(P["v_blocks"]):
        if M > 0 and i < J:
            keep = x if i == 0 else x[:, : x.shape[1] - M]
            x = torch.cat([keep, vis_prompts[i].unsqueeze(0).expand(x.shape[0], -1, -1)], 1)
        x = block(x, p, P["v_heads"], act)
        if i + 1 in out_layers:
            taps.append(x[:, : x.shape[1] - M])
    pooled = ln(x[:, 0], P["ln_post"]) @ P["v_proj"]
    return pooled, taps


def adaclip_text_prompted(P, ids, txt_prompts, act, M, J):
    """txt_prompts[i]: [M, Dt] (f16-rounded) replacing positions 1..M at layers 1 <= i < J."""
    x = P["tok_emb"][ids] + P["t_pos"]
    for i, p in enumerate(P["t_blocks"]):
        if M > 0 and 1 <= i < J:
            x = torch.cat([x[:, :1], txt_prompts[i].unsqueeze(0).expand(x.shape[0], -1, -1), x[:, 1 + M:]], 1)
        x = block(x, p, P["t_heads"], act, causal_mask(ids.shape[1]))
    return text_pool(P, x, ids)


def hsf_direct(feats, logits, k_clusters):
    """HSF with one cluster: h = normalize(mean over top-k patches of mean over layers of F_l)."""
    assert k_clusters == 1
    p = torch.softmax(torch.stack(logits, 0).mean(0), -1)[:, 1]
    k = min(p.shape[0], 5 * k_clusters)
    idx = torch.topk(p, k).indices
    h = torch.cat([f[idx] for f in feats], 0).mean(0)
    return F.normalize(h, dim=-1), idx, p


def hsf_sklearn(feats, logits, k_clusters):
    """The same through the original code's route (stack, KMeans.fit_predict, per-cluster means, mean of centres)."""
    from sklearn.cluster import KMeans

    p = torch.softmax(torch.stack(logits, 0).mean(0), -1)[:, 1]
    idx = torch.topk(p, min(p.shape[0], 5 * k_clusters)).indices
    sel = [f[idx] for f in feats]
    labels = KMeans(n_clusters=k_clusters, n_init="auto", random_state=0).fit_predict(torch.cat(sel, 1).numpy())
    centres = []
    for c in range(k_clusters):
        m = torch.from_numpy(labels == c)
        centres.append(torch.cat([s[m] for s in sel], 0).mean(0, keepdim=True))
    return F.normalize(torch.cat(centres, 0).mean(0), dim=-1)


def case_adaclip(model, tok):
    P = clip_params(model)
    act = "gelu"
    px = mf.pixels(1, IMAGE_SIZE)
    pos = resize_pos(P["v_pos"], GRID, "bicubic")
    dv, dt = P["conv_w"].shape[0], P["tok_emb"].shape[1]
    A = adaclip_params(dv, dt, P["v_proj"].shape[1])

    # A: plain pass -> g, dynamic prompts
    g, _ = plain_vision(P, px, pos, act)
    g = g[0]
    dyn_v = torch.stack([ada_lin(A, f"clip_model.dynamic_visual_prompt_generator.head.{i}", g) for i in range(ADA_M)])
    dyn_t = torch.stack([ada_lin(A, f"clip_model.dynamic_text_prompt_generator.head.{i}", g) for i in range(ADA_M)])
    vis_prompts = [f16(dyn_v + A[f"clip_model.visual_prompter.static_prompts.{i}"]) for i in range(ADA_J)]
    txt_prompts = [f16(dyn_t + A[f"clip_model.text_prompter.static_prompts.{i}"]) for i in range(ADA_J)]

    # B: prompted vision pass
    pooled, taps = adaclip_vision_prompted(P, px, pos, vis_prompts, act, ADA_M, ADA_J, ADA_LAYERS)
    pooled = pooled[0]

    # D: text
    ids_n = tokenize(tok, ada_sentences(NORMAL_STATES, "object"))
    ids_a = tokenize(tok, ada_sentences(ABNORMAL_STATES, "object"))
    assert ids_n.shape == (28, 77) and ids_a.shape == (20, 77)
    tf = []
    for ids in (ids_n, ids_a):
        e = F.normalize(adaclip_text_prompted(P, ids, txt_prompts, act, ADA_M, ADA_J), dim=-1)
        tf.append(F.normalize(e.mean(0), dim=-1))
    T = F.normalize(torch.stack(tf, 0), dim=-1)  # [2, 24]; adaclip.py normalises the stacked features again

    # C: projections
    feats = [F.normalize(ada_lin(A, f"clip_model.patch_token_layer.head.{l}", taps[l][0, 1:]), dim=-1)
             for l in range(len(ADA_LAYERS))]
    c = F.normalize(ada_lin(A, "clip_model.cls_token_layer.head.0", pooled), dim=-1)

    # E: logits, HSF, score, map
    logits = [100.0 * f @ T.t() for f in feats]  # [64, 2] each
    h, idx, p_hsf = hsf_direct(feats, logits, ADA_K)
    h_sk = hsf_sklearn(feats, logits, ADA_K)
    assert torch.allclose(h, h_sk, atol=1e-6), (h - h_sk).abs().max()
    ps = p_hsf.sort(descending=True).values
    print(f"adaclip: HSF top-5 {idx.tolist()}, gap 5th/6th {float(ps[4] - ps[5]):.3g}")
    assert float(ps[4] - ps[5]) > 1e-4, "top-k selection too close to a tie; pick another seed"
    s = F.normalize(0.2 * h + 0.8 * c, dim=-1)
    score = torch.softmax(100.0 * s @ T.t(), -1)[1:2]
    ups = [F.interpolate(a.t().reshape(1, 2, GRID, GRID), size=IMAGE_SIZE, mode="bilinear", align_corners=True)
           for a in logits]
    prob = torch.softmax(torch.stack(ups, 1).mean(1), dim=1)
    map_raw = ((prob[:, 1] + 1 - prob[:, 0]) / 2.0)[0]
    smooth = torch.from_numpy(gaussian_filter(map_raw.numpy(), sigma=4))

    EXPECTED.update({
        "adaclip.tokens_normal": ids_n, "adaclip.tokens_abnormal": ids_a,
        "adaclip.g": g, "adaclip.pooled": pooled, "adaclip.text": T,
        "adaclip.logits": torch.stack(logits, 0), "adaclip.map_raw": map_raw, "adaclip.map": smooth,
        "adaclip.score": score,
    })
    torch.save({k: v.contiguous().clone() for k, v in A.items()}, str(OUT / "adaclip_tiny.pth"))
    # Do the prompts matter? (sanity: the fixture must exercise them)
    g_pooled_diff = float((F.normalize(g, dim=-1) - F.normalize(pooled, dim=-1)).norm())
    print(f"adaclip: score {float(score):.6f}, map_raw [{float(map_raw.min()):.4f}, {float(map_raw.max()):.4f}], "
          f"|g^-pooled^| {g_pooled_diff:.3f}, logits range [{float(torch.stack(logits).min()):.2f}, "
          f"{float(torch.stack(logits).max()):.2f}]")
    return dict(P=P, A=A, px=px, pos=pos, g=g, taps=taps, ids_n=ids_n, ids_a=ids_a, pooled=pooled, T=T,
                vis_prompts=vis_prompts, txt_prompts=txt_prompts)


# --------------------------------------------------------------------------------------------------
# AnomalyCLIP / HeadCLIP


AC_NCTX, AC_DEPTH, AC_TNCTX, AC_FEATURES, AC_FIRST_VV = 4, 3, 2, [2, 4], 2


def anomalyclip_params(P, tok, seed=202):
    torch.manual_seed(seed)
    dt = P["tok_emb"].shape[1]
    prefix = " ".join(["X"] * AC_NCTX)
    ids_pos = tokenize(tok, [prefix + " " + "{}".format("object") + "."])
    ids_neg = tokenize(tok, [prefix + " " + "damaged {}".format("object") + "."])
    emb_pos, emb_neg = P["tok_emb"][ids_pos], P["tok_emb"][ids_neg]  # [1, 77, dt]
    d = OrderedDict()
    d["ctx_pos"] = f16(0.5 * torch.randn(1, 1, AC_NCTX, dt))
    d["ctx_neg"] = f16(0.5 * torch.randn(1, 1, AC_NCTX, dt))
    d["token_prefix_pos"] = emb_pos[:, None, :1].clone()
    d["token_suffix_pos"] = emb_pos[:, None, 1 + AC_NCTX:].clone()
    d["token_prefix_neg"] = emb_neg[:, None, :1].clone()
    d["token_suffix_neg"] = emb_neg[:, None, 1 + AC_NCTX:].clone()
    d["tokenized_prompts_pos"] = ids_pos[:, None].clone()
    d["tokenized_prompts_neg"] = ids_neg[:, None].clone()
    for i in range(AC_DEPTH - 1):
        d[f"compound_prompts_text.{i}"] = f16(0.5 * torch.randn(AC_TNCTX, dt))
    for i in range(AC_DEPTH - 1):  # dead parameters (never used in forward), present in real checkpoints
        w, b = linear_f16(dt, 2 * dt)
        d[f"compound_prompt_projections.{i}.weight"], d[f"compound_prompt_projections.{i}.bias"] = w, b
    return d, ids_pos, ids_neg


def anomalyclip_text(P, L, ctx_override=None, deep=True):
    """Returns (T [2, Dproj] normalised rows, ids [2, 77]). ctx_override=(pos, neg) for the self-check."""
    ctx = ctx_override or (L["ctx_pos"], L["ctx_neg"])
    prompts = torch.cat([
        torch.cat([L["token_prefix_pos"], ctx[0], L["token_suffix_pos"]], 2).reshape(1, 77, -1),
        torch.cat([L["token_prefix_neg"], ctx[1], L["token_suffix_neg"]], 2).reshape(1, 77, -1),
    ], 0)
    ids = torch.cat([L["tokenized_prompts_pos"].reshape(1, 77), L["tokenized_prompts_neg"].reshape(1, 77)], 0)
    x = prompts + P["t_pos"]
    deeper = [L[f"compound_prompts_text.{i}"] for i in range(AC_DEPTH - 1)] if deep else []
    for i, p in enumerate(P["t_blocks"]):
        if 1 <= i <= len(deeper):  # layer 0 unchanged; layer i uses compound_prompts_text[i-1]
            c = f16(deeper[i - 1]).unsqueeze(0).expand(x.shape[0], -1, -1)  # .half() in the original: exact here
            x = torch.cat([x[:, :1], c, x[:, 1 + c.shape[1]:]], 1)
        x = block(x, p, P["t_heads"], "quick_gelu", causal_mask(77))
    return F.normalize(text_pool(P, x, ids), dim=-1), ids


def anomalyclip_vision(P, px, pos, features, first_vv, head_w=None):
    """DPAM / V-V from 1-based layer `first_vv` to the last. head_w: [layers, heads] or None.
    Returns image feature (x_ori[CLS] @ proj, no ln_post), per-feature-layer tokens (V-V path) and x_ori per layer."""
    act = "quick_gelu"
    H = P["v_heads"]
    x = vision_embed(P, px, pos)
    x_vv = None
    taps, ori_hs = [], [x]
    for l, p in enumerate(P["v_blocks"], start=1):
        w = None if head_w is None else head_w[l - 1]
        if l < first_vv:
            x = block(x, p, H, act, head_w=w)
        else:
            ori, vv = attention_heads(ln(x, (p["ln1_w"], p["ln1_b"])), p, H, vv=True)
            vv_out = merge_heads(vv, p, w)
            x_new = x + merge_heads(ori, p, w)
            x_new = x_new + mlp(ln(x_new, (p["ln2_w"], p["ln2_b"])), p, act)
            x_vv = (x if l == first_vv else x_vv) + vv_out  # first V-V block: no MLP on the V-V path
            x = x_new
        ori_hs.append(x)
        if l in features:
            taps.append(x if l < first_vv else x_vv)
    img = x[:, 0] @ P["v_proj"]
    return img, taps, ori_hs


def anomalyclip_maps(P, T, img, taps):
    probs = []
    amaps = []
    for t in taps:
        pf = F.normalize(ln(t, P["ln_post"]) @ P["v_proj"], dim=-1)[0]  # [65, Dproj]
        pr = torch.softmax(pf @ T.t() / 0.07, -1)[1:]  # CLS dropped -> [64, 2]
        probs.append(pr)
        up = F.interpolate(pr.reshape(1, GRID, GRID, 2).permute(0, 3, 1, 2), size=(IMAGE_SIZE, IMAGE_SIZE),
                           mode="bilinear", align_corners=False)[0]
        amaps.append((up[1] + 1 - up[0]) / 2.0)
    map_raw = torch.stack(amaps, 0).sum(0)
    smooth = torch.from_numpy(gaussian_filter(map_raw.numpy(), sigma=4))
    score = torch.softmax(F.normalize(img[0], dim=-1) @ T.t() / 0.07, -1)[1:2]
    return torch.stack(probs, 0), map_raw, smooth, score


def case_anomalyclip(model, tok):
    P = clip_params(model)
    px = mf.pixels(1, IMAGE_SIZE)
    pos = resize_pos(P["v_pos"], GRID, "bilinear")
    L, ids_pos, ids_neg = anomalyclip_params(P, tok)
    T, _ = anomalyclip_text(P, L)
    img, taps, _ = anomalyclip_vision(P, px, pos, AC_FEATURES, AC_FIRST_VV)
    probs, map_raw, smooth, score = anomalyclip_maps(P, T, img, taps)
    EXPECTED.update({
        "anomalyclip.tokens_normal": ids_pos, "anomalyclip.tokens_abnormal": ids_neg,
        "anomalyclip.text": T, "anomalyclip.image_feature": img[0], "anomalyclip.probs": probs,
        "anomalyclip.map_raw": map_raw, "anomalyclip.map": smooth, "anomalyclip.score": score,
    })
    torch.save({"prompt_learner": OrderedDict((k, v.contiguous().clone()) for k, v in L.items())},
               str(OUT / "anomalyclip_tiny.pth"))
    print(f"anomalyclip: score {float(score):.6f}, map_raw [{float(map_raw.min()):.4f}, {float(map_raw.max()):.4f}],"
          f" probs[...,1] range [{float(probs[..., 1].min()):.4f}, {float(probs[..., 1].max()):.4f}]")

    # HeadCLIP: same prompts, head weights on every vision block (both paths in V-V blocks)
    torch.manual_seed(303)
    hw = f16(torch.empty(len(P["v_blocks"]), P["v_heads"]).uniform_(0.5, 1.5))
    img_h, taps_h, _ = anomalyclip_vision(P, px, pos, AC_FEATURES, AC_FIRST_VV, head_w=hw)
    probs_h, map_raw_h, smooth_h, score_h = anomalyclip_maps(P, T, img_h, taps_h)
    EXPECTED.update({
        "headclip.head_weights": hw, "headclip.image_feature": img_h[0], "headclip.probs": probs_h,
        "headclip.map_raw": map_raw_h, "headclip.map": smooth_h, "headclip.score": score_h,
    })
    print(f"headclip: score {float(score_h):.6f}, max |map_raw - anomalyclip| "
          f"{float((map_raw_h - map_raw).abs().max()):.4f}")
    return dict(P=P, L=L, px=px, pos=pos, T=T, hw=hw)


# --------------------------------------------------------------------------------------------------
# Self-check against transformers.CLIPModel (independent path for the towers, V-V identity, head weights)


@torch.no_grad()
def self_check(model, tok, ada, ac):
    from transformers import CLIPConfig, CLIPModel

    tol = 1e-5

    def close(name, a, b):
        err = float((a - b).abs().max())
        assert err < tol, f"{name}: max abs err {err}"
        print(f"  ok {name:<48} {err:.2e}")

    print("self-check vs transformers.CLIPModel:")
    px = ada["px"]
    for act in ["gelu", "quick_gelu"]:
        cfg = CLIPConfig.from_dict(model.config.to_dict())
        cfg.vision_config.hidden_act = act
        cfg.text_config.hidden_act = act
        hf = CLIPModel(cfg).eval()
        hf.load_state_dict(model.state_dict())
        P = clip_params(hf)
        # vision at 32 px, native position embeddings
        px32 = mf.pixels(1, 32)
        ref = hf.vision_model(pixel_values=px32, output_hidden_states=True)
        emb, hs = plain_vision(P, px32, P["v_pos"], act)
        for i, h in enumerate(hs):
            close(f"{act} vision 32px hidden_{i}", h, ref.hidden_states[i])
        close(f"{act} vision 32px image_embeds", emb, hf.visual_projection(ref.pooler_output))
        # vision at 64 px, bicubic position embeddings (HF interpolate_pos_encoding is bicubic, align_corners=False)
        ref = hf.vision_model(pixel_values=px, output_hidden_states=True, interpolate_pos_encoding=True)
        emb, hs = plain_vision(P, px, resize_pos(P["v_pos"], GRID, "bicubic"), act)
        for i, h in enumerate(hs):
            close(f"{act} vision 64px bicubic hidden_{i}", h, ref.hidden_states[i])
        close(f"{act} vision 64px bicubic image_embeds", emb, hf.visual_projection(ref.pooler_output))
        # text (the 28 AdaCLIP normal sentences)
        ids = ada["ids_n"]
        ref = hf.text_model(input_ids=ids, output_hidden_states=True)
        emb, hs = plain_text(P, ids, act)
        for i, h in enumerate(hs):
            close(f"{act} text hidden_{i}", h, ref.hidden_states[i])
        close(f"{act} text_embeds", emb, hf.text_projection(ref.pooler_output))
        if act == "gelu":
            # AdaCLIP with zero-length prompts == plain towers; g == HF image embeds at 64 px bicubic
            g_ref = hf.visual_projection(hf.vision_model(pixel_values=px, interpolate_pos_encoding=True).pooler_output)
            close("adaclip g == HF gelu image_embeds@64 (bicubic)", ada["g"], g_ref[0])
            pooled0, taps0 = adaclip_vision_prompted(P, px, ada["pos"], None, act, 0, ADA_J, ADA_LAYERS)
            close("adaclip M=0 pooled == g", pooled0[0], ada["g"])
            ref = hf.vision_model(pixel_values=px, output_hidden_states=True, interpolate_pos_encoding=True)
            for l, t in zip(ADA_LAYERS, taps0):
                close(f"adaclip M=0 tap layer {l} == HF hidden_{l}", t, ref.hidden_states[l])
            t0 = adaclip_text_prompted(P, ids, None, act, 0, ADA_J)
            close("adaclip M=0 text == HF gelu text_embeds", t0,
                  hf.text_projection(hf.text_model(input_ids=ids).pooler_output))
            # prompted passes through HF modules, prompts inserted by hooks
            pooled_hf, taps_hf = hf_prompted_vision(hf, px, ada["vis_prompts"], ADA_M, ADA_J)
            close("adaclip prompted pooled == HF+hooks", ada["pooled"], pooled_hf[0])
            for l, t in zip(ADA_LAYERS, ada["taps"]):
                close(f"adaclip prompted tap {l} == HF+hooks", t, taps_hf[l][:, : taps_hf[l].shape[1] - ADA_M])
            assert float((ada["taps"][-1] - ref.hidden_states[4]).abs().max()) > 1e-2  # prompts matter
            tf = []
            for ids_s in (ada["ids_n"], ada["ids_a"]):
                e = hf_prompted_text(hf, ids_s, None, {i: ada["txt_prompts"][i] for i in range(1, ADA_J)})
                tf.append(F.normalize(F.normalize(e, dim=-1).mean(0), dim=-1))
            close("adaclip prompted text T == HF+hooks", ada["T"], torch.stack(tf, 0))
        else:
            # AnomalyCLIP text: with the real "X" embeddings as context and no deep prompts == HF text_embeds
            L = ac["L"]
            xe_pos = P["tok_emb"][L["tokenized_prompts_pos"].reshape(-1)[1:1 + AC_NCTX]].reshape(1, 1, AC_NCTX, -1)
            xe_neg = P["tok_emb"][L["tokenized_prompts_neg"].reshape(-1)[1:1 + AC_NCTX]].reshape(1, 1, AC_NCTX, -1)
            T0, ids2 = anomalyclip_text(P, L, ctx_override=(xe_pos, xe_neg), deep=False)
            te = hf.text_projection(hf.text_model(input_ids=ids2).pooler_output)
            close("anomalyclip text (X ctx, no deep) == HF", T0, F.normalize(te, dim=-1))
            ctx = torch.cat([L["ctx_pos"].reshape(1, AC_NCTX, -1), L["ctx_neg"].reshape(1, AC_NCTX, -1)], 0)
            deep = {i: L[f"compound_prompts_text.{i - 1}"] for i in range(1, AC_DEPTH)}
            te = hf_prompted_text(hf, ids2, ctx, deep)
            close("anomalyclip text (learned ctx + deep) == HF+hooks", ac["T"], F.normalize(te, dim=-1))
            # Vision at 64 px with bilinear position embeddings: an HF model built for 64 px carrying them
            c64 = CLIPConfig.from_dict(cfg.to_dict())
            c64.vision_config.image_size = IMAGE_SIZE
            hf64 = CLIPModel(c64).eval()
            sd = dict(hf.state_dict())
            sd["vision_model.embeddings.position_embedding.weight"] = ac["pos"]
            sd.pop("vision_model.embeddings.position_ids", None)
            hf64.load_state_dict(sd, strict=False)
            ref = hf64.vision_model(pixel_values=px, output_hidden_states=True)
            # V-V disabled (first_vv past the last layer): plain stream, taps == HF hidden states
            img0, taps0, ori0 = anomalyclip_vision(P, px, ac["pos"], [1, 2, 3, 4], 99)
            for l, t in enumerate(taps0, start=1):
                close(f"anomalyclip V-V off tap {l} == HF64 hidden_{l}", t, ref.hidden_states[l])
            close("anomalyclip V-V off image feature (no ln_post)",
                  img0, ref.hidden_states[-1][:, 0] @ P["v_proj"])
            # V-V on: x_ori is the plain stream; x_vv = x^(first-1) + sum_l VV_l(ln_1(x_ori^(l-1))) via HF modules
            img1, taps1, ori1 = anomalyclip_vision(P, px, ac["pos"], [2, 3, 4], AC_FIRST_VV)
            for l in range(5):
                close(f"anomalyclip V-V on x_ori {l} == HF64 hidden_{l}", ori1[l], ref.hidden_states[l])
            close("anomalyclip V-V on image feature == HF x[CLS]@proj", img1, ref.hidden_states[-1][:, 0] @ P["v_proj"])
            acc = ref.hidden_states[AC_FIRST_VV - 1].clone()
            for l in range(AC_FIRST_VV, 5):
                layer = hf64.vision_model.encoder.layers[l - 1]
                vv_ref = vv_via_hf(layer, layer.layer_norm1(ref.hidden_states[l - 1]), c64.vision_config)
                acc = acc + vv_ref
                close(f"anomalyclip x_vv layer {l} == HF-module V-V sum", taps1[l - AC_FIRST_VV], acc)
            # head weights: scaling head h's output == scaling out_proj's input columns of head h
            hw = ac["hw"]
            hfw = CLIPModel(c64).eval()
            hfw.load_state_dict(sd, strict=False)
            hd = c64.vision_config.hidden_size // c64.vision_config.num_attention_heads
            for l, layer in enumerate(hfw.vision_model.encoder.layers):
                layer.self_attn.out_proj.weight.mul_(hw[l].repeat_interleave(hd)[None, :])
            refw = hfw.vision_model(pixel_values=px, output_hidden_states=True)
            img2, taps2, ori2 = anomalyclip_vision(P, px, ac["pos"], [2, 3, 4], AC_FIRST_VV, head_w=hw)
            for l in range(5):
                close(f"headclip x_ori {l} == HF64(out_proj cols scaled) hidden_{l}", ori2[l], refw.hidden_states[l])
            acc = refw.hidden_states[AC_FIRST_VV - 1].clone()
            for l in range(AC_FIRST_VV, 5):
                layer = hfw.vision_model.encoder.layers[l - 1]
                acc = acc + vv_via_hf(layer, layer.layer_norm1(refw.hidden_states[l - 1]), c64.vision_config)
                close(f"headclip x_vv layer {l} == HF-module V-V sum", taps2[l - AC_FIRST_VV], acc)
            ones = torch.ones_like(hw)
            img3, taps3, _ = anomalyclip_vision(P, px, ac["pos"], AC_FEATURES, AC_FIRST_VV, head_w=ones)
            img4, taps4, _ = anomalyclip_vision(P, px, ac["pos"], AC_FEATURES, AC_FIRST_VV)
            close("headclip weights 1 == anomalyclip (image feature)", img3, img4)
            for a, b in zip(taps3, taps4):
                close("headclip weights 1 == anomalyclip (taps)", a, b)


def hf_prompted_vision(hf, px, prompts, M, J):
    """HF vision tower at 64 px (bicubic pos), AdaCLIP prompts inserted by pre-hooks on the encoder layers."""
    hooks, outs = [], {}
    for i, layer in enumerate(hf.vision_model.encoder.layers):
        if i < J:
            def pre(mod, args, i=i):
                x = args[0]
                keep = x if i == 0 else x[:, : x.shape[1] - M]
                return (torch.cat([keep, prompts[i][None]], 1),) + tuple(args[1:])
            hooks.append(layer.register_forward_pre_hook(pre))

        def post(mod, args, out, i=i):
            outs[i + 1] = out[0] if isinstance(out, tuple) else out
        hooks.append(layer.register_forward_hook(post))
    try:
        o = hf.vision_model(pixel_values=px, interpolate_pos_encoding=True)
    finally:
        for h in hooks:
            h.remove()
    return hf.visual_projection(o.pooler_output), outs


def hf_prompted_text(hf, ids, ctx, deep):
    """HF text tower; ctx [N, n, D] replaces token embeddings 1..n (hook on token_embedding); deep[i] [m, D]
    replaces positions 1..m at the input of layer i (pre-hook)."""
    hooks = []
    if ctx is not None:
        def emb_hook(mod, args, out):
            return torch.cat([out[:, :1], ctx, out[:, 1 + ctx.shape[1]:]], 1)
        hooks.append(hf.text_model.embeddings.token_embedding.register_forward_hook(emb_hook))
    for i, c in deep.items():
        def pre(mod, args, c=c):
            x = args[0]
            return (torch.cat([x[:, :1], c[None].expand(x.shape[0], -1, -1), x[:, 1 + c.shape[0]:]], 1),) \
                + tuple(args[1:])
        hooks.append(hf.text_model.encoder.layers[i].register_forward_pre_hook(pre))
    try:
        o = hf.text_model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return hf.text_projection(o.pooler_output)


def vv_via_hf(layer, h, vcfg):
    """V-V attention of one HF encoder layer, from its own v_proj/out_proj modules."""
    H = vcfg.num_attention_heads
    n, l, d = h.shape
    v = layer.self_attn.v_proj(h).reshape(n, l, H, d // H).transpose(1, 2)
    a = torch.softmax(v @ v.transpose(-1, -2) * (d // H) ** -0.5, -1) @ v
    return layer.self_attn.out_proj(a.transpose(1, 2).reshape(n, l, d))


# --------------------------------------------------------------------------------------------------


def main():
    torch.set_num_threads(2)
    if not (SHARED / "clip-tokenizer").exists():
        sys.exit(f"{SHARED / 'clip-tokenizer'} is needed")
    cfg = mf.make_config(
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
             patch_size=8),
        dict(vocab_size=49408, hidden_size=TEXT_W, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2),
        24, "quick_gelu", 2)
    model = mf.build(cfg, MODEL_SEED)
    tok = tokenizer()
    with torch.no_grad():
        ada = case_adaclip(model, tok)
        ac = case_anomalyclip(model, tok)
    self_check(model, tok, ada, ac)
    mf.save_model(model, "tiny-method")
    out = {k: (v.to(torch.int64) if k.startswith(("adaclip.tokens", "anomalyclip.tokens")) else v.float())
           .contiguous() for k, v in EXPECTED.items()}
    save_file(out, str(OUT / "methods.expected.safetensors"),
              metadata={"source": "scripts/make_method_fixtures.py, image make_fixtures.pixels(1, 64)"})  # one key: stable bytes
    files = [OUT / "models" / "tiny-method" / "config.json", OUT / "models" / "tiny-method" / "model.safetensors",
             OUT / "adaclip_tiny.pth", OUT / "anomalyclip_tiny.pth", OUT / "methods.expected.safetensors"]
    for f in files:
        print(f"wrote {f.relative_to(OUT.parent.parent)} ({f.stat().st_size} B)")
    print(f"total {sum(f.stat().st_size for f in files) / 1e6:.2f} MB")
    print(json.dumps({k: list(v.shape) for k, v in out.items()}))


if __name__ == "__main__":
    main()
