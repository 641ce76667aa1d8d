"""A small timm-like model registry.

``create_model("cmaf_net", num_classes=2, **overrides)`` builds CMAF-Net; any timm architecture is
available as ``"timm:<name>"`` (always randomly initialised: this project downloads no weights).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from wsi_cmaf.errors import ModelConfigError, ModelError

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"


class SplitModel(Protocol):
    """timm's features/head split, which registry models, encoders and timm models share.

    nn.Module types attributes it does not declare as ``Tensor | Module``; callers that checked a
    model has the split ``cast`` it to this. ``forward_head`` gives a tensor, or ``{task: tensor}``
    for a multi-task model's logits (``pre_logits=True`` is always one tensor).
    """

    def forward_features(self, *inputs: Any) -> torch.Tensor: ...

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> Any: ...
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | Callable[..., nn.Module] | None = None) -> Callable:
    """Decorator registering a factory ``fn(num_classes=..., **kwargs) -> nn.Module``.

    Use bare (``@register_model``: the function name is the model name) or with a name.
    """

    def wrap(fn: Callable[..., nn.Module], key: str | None = None) -> Callable[..., nn.Module]:
        key = key or fn.__name__
        if key.startswith(TIMM_PREFIX):
            raise ModelError(f"model names may not start with {TIMM_PREFIX!r}: {key}")
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            logger.warning("model %r re-registered; the newer factory wins", key)
        _REGISTRY[key] = fn
        return fn

    if callable(name):
        return wrap(name)
    return lambda fn: wrap(fn, name)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern (``timm:<name>`` is accepted too)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """Whether :func:`create_model` can build ``name``."""
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.is_model(name[len(TIMM_PREFIX):])
    return name in _REGISTRY


def create_model(name: str = "cmaf_net", num_classes: int = 2, pretrained: bool = False,
                 **overrides: Any) -> nn.Module:
    """Build a registered model with random weights.

    ``pretrained=True`` is refused: no pretrained CMAF-Net weights exist, and this project never
    downloads weights. Load trained weights with :func:`wsi_cmaf.models.load_model` instead.
    ``input_size`` is accepted for every model (the networks here are size-agnostic); timm ViTs
    that need a fixed size take ``img_size=...``.
    """
    if pretrained:
        raise ModelError(
            f"pretrained weights are not available for {name!r}; train one or load_model(path)"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name[len(TIMM_PREFIX):]
        if not timm.is_model(arch):
            raise ModelError(f"timm has no model {arch!r}")
        overrides.pop("input_size", None)
        try:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, **overrides)
        except TypeError as exc:
            raise ModelConfigError(f"bad option for timm model {arch!r}: {exc}") from exc
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; registered: {list_models()} or 'timm:<name>'")
    try:
        return _REGISTRY[name](num_classes=num_classes, **overrides)
    except TypeError as exc:
        raise ModelConfigError(f"bad option for model {name!r}: {exc}") from exc
