"""Registry of the classification losses: ``create_loss(name, class_counts, **kw)`` and ``LOSSES``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses.acbfl import ACBFL
from wsi_cmaf.losses.base import ImbalanceLoss
from wsi_cmaf.losses.baselines import BalancedSoftmax, ClassBalancedLoss, CrossEntropy, FocalLoss, LDAMLoss

__all__ = ["ALIASES", "LOSSES", "canonical_loss_name", "create_loss"]

# name -> (class, preset keyword arguments). Ablation variants are presets of A-CBFL.
#: name -> (loss class, called with the class counts first; its preset keyword arguments)
_REGISTRY: dict[str, tuple[Callable[..., ImbalanceLoss], dict[str, Any]]] = {
    "cross_entropy": (CrossEntropy, {}),
    "weighted_cross_entropy": (CrossEntropy, {"weighting": "inverse"}),
    "sqrt_weighted_cross_entropy": (CrossEntropy, {"weighting": "sqrt_inverse"}),
    "focal": (FocalLoss, {}),
    "class_balanced": (ClassBalancedLoss, {}),
    "ldam": (LDAMLoss, {}),
    "balanced_softmax": (BalancedSoftmax, {}),
    "acbfl": (ACBFL, {}),
    "acbfl_no_class_gamma": (ACBFL, {"class_gamma": False}),
    "acbfl_no_dynamic": (ACBFL, {"dynamic_alpha": False}),
}
LOSSES: tuple[str, ...] = tuple(_REGISTRY)
ALIASES: dict[str, str] = {
    "ce": "cross_entropy",
    "inverse_frequency_ce": "weighted_cross_entropy",
    "sqrt_ce": "sqrt_weighted_cross_entropy",
    "cb": "class_balanced",
    "cb_loss": "class_balanced",
    "a_cbfl": "acbfl",
    "balanced_softmax_loss": "balanced_softmax",
    "acbfl_fixed_gamma": "acbfl_no_class_gamma",
    "acbfl_static_alpha": "acbfl_no_dynamic",
}


def canonical_loss_name(name: str) -> str:
    """Map a loss name or alias (case-insensitive, '-' or '_') to its canonical name in :data:`LOSSES`."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return key


def create_loss(name: str, class_counts: Sequence[float] | Tensor, **kwargs: Any) -> ImbalanceLoss:
    """Build the loss ``name`` for a training set with ``class_counts`` samples per class.

    ``kwargs`` go to the loss class (e.g. ``gamma_base``, ``lambda_smooth``, ``reduction``); they may
    not contradict an ablation preset (e.g. ``class_gamma=True`` with ``"acbfl_no_class_gamma"``).
    """
    key = canonical_loss_name(name)
    cls, preset = _REGISTRY[key]
    for k, v in preset.items():
        if k in kwargs and kwargs[k] != v:
            raise ConfigError(f"loss {key!r} fixes {k}={v!r}; got {k}={kwargs[k]!r}")
    try:
        return cls(class_counts, **{**preset, **kwargs})
    except TypeError as exc:  # unknown keyword: name the loss so the config error is actionable
        raise ConfigError(f"bad arguments for loss {key!r}: {exc}") from exc
