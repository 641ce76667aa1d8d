"""The encoder registry: one data entry per pathology foundation model (``registry.json``).

An entry says everything needed to run an encoder on slide tiles without its authors' code:
the timm architecture and keyword arguments, the input size, the µm/px it was trained at, its
normalisation, how the embedding is formed from the tokens, the checkpoint layout it ships in,
its licence and gating, and where these facts come from. Layer classes that JSON cannot hold
are named (``"mlp_layer": "SwiGLUPacked"``) and resolved by :func:`timm_kwargs`.

``timm:<architecture>`` names any timm model as an ad-hoc encoder (CLS/pooled output of
``forward_head(pre_logits=True)``, ImageNet normalisation, 224 px at 0.5 µm/px unless told).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from wsi_cmaf.config_dict import check_keys
from wsi_cmaf.errors import ConfigError, UnknownEncoderError

REGISTRY_FILE = Path(__file__).with_name("registry.json")
#: how an embedding is made from the trunk's normalised tokens (B, N, D)
POOLINGS = ("cls", "cls+mean_patch", "timm")
#: checkpoint layouts the loader reads (see keymap.py)
FORMATS = ("timm", "hf_vit", "hf_dinov2")
#: the keys an entry of registry.json may have (``embedding`` and ``checkpoint`` are sub-mappings)
_ENTRY_KEYS = ("name", "title", "timm_arch", "timm_kwargs", "input_size", "mpp", "mean", "std", "embedding",
               "checkpoint", "params", "licence", "gated", "gating", "resize", "notes", "sources")
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry (see the module docstring)."""

    name: str
    title: str
    timm_arch: str
    timm_kwargs: dict[str, Any]
    input_size: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    pooling: str
    checkpoint_format: str
    checkpoint_files: tuple[str, ...]
    hf_repo: str | None
    params: str | None
    licence: str
    gated: bool
    gating: str = ""
    resize: str = "bilinear"
    notes: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        """An entry of ``registry.json`` as a spec; a :class:`ConfigError` names a bad or unknown field."""
        where = f"encoder registry entry {d.get('name')!r}"
        check_keys(d, _ENTRY_KEYS, where=where)
        emb, ckpt = d["embedding"], d["checkpoint"]
        check_keys(emb, ("dim", "pooling"), where=f"{where}: embedding")
        check_keys(ckpt, ("format", "files", "hf_repo"), where=f"{where}: checkpoint")
        spec = cls(name=d["name"], title=d.get("title", d["name"]), timm_arch=d["timm_arch"],
                   timm_kwargs=dict(d.get("timm_kwargs") or {}), input_size=int(d["input_size"]),
                   mpp=float(d["mpp"]), mean=_rgb(d["mean"], f"{where}: mean"),
                   std=_rgb(d["std"], f"{where}: std"), dim=int(emb["dim"]), pooling=emb["pooling"],
                   checkpoint_format=ckpt["format"], checkpoint_files=tuple(ckpt.get("files") or ()),
                   hf_repo=ckpt.get("hf_repo"), params=d.get("params"), licence=d.get("licence", "unknown"),
                   gated=bool(d.get("gated", False)), gating=d.get("gating", ""), resize=d.get("resize", "bilinear"),
                   notes=d.get("notes", ""), sources=tuple(d.get("sources") or ()))
        if spec.pooling not in POOLINGS:
            raise ConfigError(f"encoder {spec.name}: pooling {spec.pooling!r} is not one of {POOLINGS}")
        if spec.checkpoint_format not in FORMATS:
            raise ConfigError(f"encoder {spec.name}: checkpoint format {spec.checkpoint_format!r} "
                              f"is not one of {FORMATS}")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """JSON view, for store attributes and provenance."""
        return {"name": self.name, "timm_arch": self.timm_arch, "timm_kwargs": dict(self.timm_kwargs),
                "input_size": self.input_size, "mpp": self.mpp, "mean": list(self.mean), "std": list(self.std),
                "dim": self.dim, "pooling": self.pooling, "checkpoint_format": self.checkpoint_format,
                "hf_repo": self.hf_repo, "licence": self.licence, "gated": self.gated}


def _rgb(values: Any, where: str) -> tuple[float, float, float]:
    """Three per-channel numbers (R, G, B) of a registry entry; ConfigError otherwise."""
    numbers = tuple(float(v) for v in values)
    if len(numbers) != 3:
        raise ConfigError(f"{where} must list 3 numbers (R, G, B), got {list(values)}")
    return numbers[0], numbers[1], numbers[2]


@lru_cache(maxsize=1)
def _registry() -> dict[str, EncoderSpec]:
    doc = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    specs = [EncoderSpec.from_dict(d) for d in doc["encoders"]]
    return {s.name: s for s in specs}


def list_encoders() -> list[EncoderSpec]:
    """Every registered encoder, in registry order."""
    return list(_registry().values())


def get_encoder(name: str, *, input_size: int | None = None, mpp: float | None = None) -> EncoderSpec:
    """The spec of a registered encoder, or of ``timm:<architecture>``.

    ``input_size`` / ``mpp`` set the geometry of a ``timm:`` encoder (default 224 px, 0.5 µm/px);
    registered encoders keep their own. Unknown names raise :class:`UnknownEncoderError`.
    """
    reg = _registry()
    key = str(name).strip()
    if key in reg:
        return reg[key]
    lowered = {k.lower(): v for k, v in reg.items()}
    if key.lower() in lowered:
        return lowered[key.lower()]
    if key.startswith(TIMM_PREFIX):
        return _timm_spec(key[len(TIMM_PREFIX):], input_size or 224, mpp or 0.5)
    raise UnknownEncoderError(f"unknown encoder {name!r}: registered encoders are {sorted(reg)}; "
                              "any timm model works as timm:<architecture> with a local weights file "
                              "(`wsi-cmaf encoders` lists them)")


def _timm_spec(arch: str, input_size: int, mpp: float) -> EncoderSpec:
    import timm

    if not arch or not timm.is_model(arch):
        raise UnknownEncoderError(f"timm has no architecture {arch!r}; pick one from timm.list_models()")
    # a ViT's position embeddings depend on the input size; other architectures take no img_size
    kwargs = {"num_classes": 0, **({"img_size": int(input_size)} if int(input_size) != 224 else {})}
    return EncoderSpec(name=f"{TIMM_PREFIX}{arch}", title=f"timm {arch}", timm_arch=arch,
                       timm_kwargs=kwargs, input_size=int(input_size), mpp=float(mpp),
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dim=0, pooling="timm",
                       checkpoint_format="timm", checkpoint_files=("model.safetensors", "pytorch_model.bin"),
                       hf_repo=None, params=None, licence="that of the weights you bring", gated=False)


_LAYERS = {"SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "SiLU": ("torch.nn", "SiLU"),
           "GELU": ("torch.nn", "GELU")}


def timm_kwargs(spec: EncoderSpec, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of ``timm.create_model`` for ``spec``, named layers resolved.

    ``norm_eps`` becomes a LayerNorm of that epsilon (HF ViT checkpoints use 1e-12, timm 1e-6).
    ``overrides`` replace entries (tests build shallow variants with ``depth=1``).
    """
    import importlib

    from torch import nn

    kw = {**spec.timm_kwargs, **overrides}
    for key in ("mlp_layer", "act_layer"):
        if isinstance(kw.get(key), str):
            module, attr = _LAYERS[kw[key]]
            kw[key] = getattr(importlib.import_module(module), attr)
    if "norm_eps" in kw:
        kw["norm_layer"] = partial(nn.LayerNorm, eps=float(kw.pop("norm_eps")))
    kw.setdefault("num_classes", 0)
    return kw
