"""Hugging Face ``transformers`` ViT / DINOv2 checkpoints mapped onto timm's ViT, without transformers.

Phikon ships as a ``ViTModel``, Phikon-v2 and Hibou-L as ``Dinov2Model`` (Hibou-L with register
tokens). Their tensors are the same maths as timm's ``VisionTransformer`` under other names, with
two differences that need arithmetic rather than renaming:

* query, key and value are three Linear layers in HF, one fused ``qkv`` in timm (concatenated
  in that order along the output dimension);
* DINOv2 with registers adds the class token's position embedding before the registers are
  inserted; timm's register models (``no_embed_class``) hold position embeddings for the patches
  only, so the class token's one is folded into ``cls_token`` (addition commutes: same output).

Tensors that inference never uses (DINOv2's ``mask_token``, ViT's ``pooler``) are dropped by name;
everything else must map, or :func:`hf_to_timm` reports it.
"""

from __future__ import annotations

import re

import torch

_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")

#: per-block renames shared by both layouts (HF suffix -> timm suffix)
_BLOCK_COMMON = {
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
}
_BLOCK_VIT = {
    "layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight", "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight", "output.dense.bias": "mlp.fc2.bias",
}
_BLOCK_DINOV2 = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
#: HF tensors with no role at inference
IGNORED = ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias")
_QKV = ("query", "key", "value")


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("vit.", "dinov2.", "model.")
                 ) -> dict[str, torch.Tensor]:
    """``state`` without a wrapper prefix that *every* key carries (``ViTForImageClassification``
    saves ``vit.*``); keys are left alone otherwise."""
    for p in prefixes:
        if state and all(k.startswith(p) for k in state):
            return {k[len(p):]: v for k, v in state.items()}
    return state


def hf_to_timm(state: dict[str, torch.Tensor], layout: str, *, fold_cls_pos: bool
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(timm state dict, HF keys that map to nothing)`` for an ``hf_vit`` / ``hf_dinov2`` checkpoint.

    ``fold_cls_pos``: the target timm model keeps no position embedding for the class token
    (``no_embed_class``), so it is added to ``cls_token`` and dropped from ``pos_embed``.
    """
    block_map = {**_BLOCK_COMMON, **(_BLOCK_VIT if layout == "hf_vit" else _BLOCK_DINOV2)}
    state = strip_prefix(dict(state))
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if m is None:
            unmapped.append(key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        qm = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if qm:
            qkv.setdefault(i, {})[f"{qm.group(1)}.{qm.group(2)}"] = value
        elif rest in block_map:
            out[f"blocks.{i}.{block_map[rest]}"] = value
        else:
            unmapped.append(key)
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            names = [f"{p}.{kind}" for p in _QKV]
            if all(n in parts for n in names):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in names], dim=0)
            else:  # an incomplete triple: report the halves it has, the strict check names the rest
                unmapped += [f"encoder.layer.{i}.attention.attention.{n}" for n in names if n in parts]
    if fold_cls_pos and "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out, sorted(unmapped)
