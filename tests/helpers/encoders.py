"""Helpers for the encoder tests: fast random weights, an HF-layout writer and plain-torch
reference forwards of Hugging Face's ViT and DINOv2 (so key mapping is checked against the maths,
not against its own inverse)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from wsi_cmaf.encoders import get_encoder
from wsi_cmaf.encoders.build import EncoderModule, build_trunk


def random_encoder(spec, seed: int = 0, **overrides) -> EncoderModule:
    """``spec``'s encoder with N(0, 0.02) weights (LayerNorm/layer-scale too), built on meta and
    filled in place: much faster than timm's truncated-normal initialisation of a ViT-L."""
    trunk = build_trunk(spec, "meta", **overrides).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return EncoderModule(trunk.eval(), spec.pooling, spec.name).eval()


def small_spec(name: str, img: int, dim: int = 64, depth: int = 2, heads: int = 4):
    """A narrow, shallow variant of a registered entry (same layout, layers and pooling)."""
    spec = get_encoder(name)
    kw = {**spec.timm_kwargs, "embed_dim": dim, "depth": depth, "num_heads": heads, "img_size": img}
    return dataclasses.replace(spec, timm_kwargs=kw, input_size=img,
                               dim=2 * dim if spec.pooling == "cls+mean_patch" else dim)


def timm_to_hf(state: dict, layout: str, depth: int, n_reg: int = 0) -> dict:
    """A timm ViT state dict written in HF ``ViTModel`` / ``Dinov2Model`` names (test-side writer)."""
    out = {"embeddings.cls_token": state["cls_token"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    pos = state["pos_embed"]
    if n_reg:  # timm (no_embed_class) keeps no class position: HF's is zero, cls_token unchanged
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        out["embeddings.register_tokens"] = state["reg_token"]
    out["embeddings.position_embeddings"] = pos
    if layout == "hf_dinov2":
        out["embeddings.mask_token"] = torch.zeros_like(state["cls_token"][0])
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = state[b + "attn.qkv.weight"].chunk(3, dim=0)
        qb, kb, vb = state[b + "attn.qkv.bias"].chunk(3, dim=0)
        for nm, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[h + f"attention.attention.{nm}.weight"], out[h + f"attention.attention.{nm}.bias"] = w, bias
        out[h + "attention.output.dense.weight"] = state[b + "attn.proj.weight"]
        out[h + "attention.output.dense.bias"] = state[b + "attn.proj.bias"]
        if layout == "hf_vit":
            names = {"layernorm_before": "norm1", "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1",
                     "output.dense": "mlp.fc2"}
        else:
            names = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
            out[h + "layer_scale1.lambda1"] = state[b + "ls1.gamma"]
            out[h + "layer_scale2.lambda1"] = state[b + "ls2.gamma"]
        for hf, tm in names.items():
            out[h + hf + ".weight"], out[h + hf + ".bias"] = state[b + tm + ".weight"], state[b + tm + ".bias"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def random_hf_state(layout: str, dim: int, depth: int, patch: int, img: int, n_reg: int = 0, seed: int = 0) -> dict:
    """Random tensors in HF layout, every one of them (position of the class token included) non-zero."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    n = (img // patch) ** 2
    st = {"embeddings.cls_token": r(1, 1, dim), "embeddings.position_embeddings": r(1, n + 1, dim),
          "embeddings.patch_embeddings.projection.weight": r(dim, 3, patch, patch),
          "embeddings.patch_embeddings.projection.bias": r(dim),
          "layernorm.weight": 1 + r(dim), "layernorm.bias": r(dim)}
    if n_reg:
        st["embeddings.register_tokens"] = r(1, n_reg, dim)
    if layout == "hf_dinov2":
        st["embeddings.mask_token"] = r(1, dim)
    for i in range(depth):
        h = f"encoder.layer.{i}."
        for nm in ("query", "key", "value"):
            st[h + f"attention.attention.{nm}.weight"], st[h + f"attention.attention.{nm}.bias"] = r(dim, dim), r(dim)
        st[h + "attention.output.dense.weight"], st[h + "attention.output.dense.bias"] = r(dim, dim), r(dim)
        n1, n2, f1, f2 = (("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense")
                          if layout == "hf_vit" else ("norm1", "norm2", "mlp.fc1", "mlp.fc2"))
        st[h + n1 + ".weight"], st[h + n1 + ".bias"] = 1 + r(dim), r(dim)
        st[h + n2 + ".weight"], st[h + n2 + ".bias"] = 1 + r(dim), r(dim)
        st[h + f1 + ".weight"], st[h + f1 + ".bias"] = r(4 * dim, dim), r(4 * dim)
        st[h + f2 + ".weight"], st[h + f2 + ".bias"] = r(dim, 4 * dim), r(dim)
        if layout == "hf_dinov2":
            st[h + "layer_scale1.lambda1"], st[h + "layer_scale2.lambda1"] = 1 + r(dim), 1 + r(dim)
    return st


def hf_reference_cls(st: dict, x: torch.Tensor, layout: str, heads: int, depth: int, patch: int) -> torch.Tensor:
    """The final class token of HF's ViTModel / Dinov2Model(-WithRegisters), written out in torch ops."""
    eps = 1e-12 if layout == "hf_vit" else 1e-6
    g = lambda k: st[k]  # noqa: E731
    proj = "embeddings.patch_embeddings.projection"
    t = F.conv2d(x, g(f"{proj}.weight"), g(f"{proj}.bias"), stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([g("embeddings.cls_token").expand(len(x), -1, -1), t], dim=1) + g("embeddings.position_embeddings")
    if "embeddings.register_tokens" in st:  # registers go in after the class token, after positions
        reg = g("embeddings.register_tokens").expand(len(x), -1, -1)
        t = torch.cat([t[:, :1], reg, t[:, 1:]], dim=1)
    d = t.shape[-1]
    hd = d // heads
    for i in range(depth):
        h = f"encoder.layer.{i}."
        n1, n2, f1, f2 = (("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense")
                          if layout == "hf_vit" else ("norm1", "norm2", "mlp.fc1", "mlp.fc2"))
        y = F.layer_norm(t, (d,), g(h + n1 + ".weight"), g(h + n1 + ".bias"), eps)
        q, k, v = (F.linear(y, g(h + f"attention.attention.{nm}.weight"), g(h + f"attention.attention.{nm}.bias"))
                   .view(len(x), -1, heads, hd).transpose(1, 2) for nm in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        a = F.linear(a.transpose(1, 2).reshape(len(x), -1, d), g(h + "attention.output.dense.weight"),
                     g(h + "attention.output.dense.bias"))
        t = t + (a * g(h + "layer_scale1.lambda1") if layout == "hf_dinov2" else a)
        y = F.layer_norm(t, (d,), g(h + n2 + ".weight"), g(h + n2 + ".bias"), eps)
        y = F.linear(F.gelu(F.linear(y, g(h + f1 + ".weight"), g(h + f1 + ".bias"))), g(h + f2 + ".weight"),
                     g(h + f2 + ".bias"))
        t = t + (y * g(h + "layer_scale2.lambda1") if layout == "hf_dinov2" else y)
    t = F.layer_norm(t, (d,), g("layernorm.weight"), g("layernorm.bias"), eps)
    return t[:, 0]
