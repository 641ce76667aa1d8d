"""Shared pieces of the classification losses: class priors, the base module, reductions.

Every loss in :mod:`wsi_cmaf.losses` is an :class:`ImbalanceLoss`: ``loss(logits, target)`` with
``logits`` of shape ``(B, C)`` (any float dtype; computed in float32 so that autocast/fp16 cannot
underflow ``log p``) and integer ``target`` of shape ``(B,)``. ``reduction`` is ``"mean"`` (default:
the plain mean over the batch, so the loss scale does not depend on the batch size), ``"sum"`` or
``"none"`` (per-sample values, used by the objective to apply per-class IB weights).

Note on class weights and ``"mean"``: ``torch.nn.functional.cross_entropy(weight=w)`` divides by the
sum of the weights of the batch; we divide by the batch size instead, which keeps the weights'
absolute scale meaningful (all our weight vectors are normalised to mean 1 over classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from wsi_cmaf.errors import ConfigError

__all__ = ["ImbalanceLoss", "class_priors", "reduce_loss", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")


def class_priors(class_counts: Sequence[float] | Tensor) -> Tensor:
    """Return the class priors π (float64, sums to 1) from per-class counts (or priors).

    Raises :class:`ConfigError` unless there are at least two finite, strictly positive counts —
    a class with no training sample has no defined prior, and every imbalance weighting divides by it.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() < 2:
        raise ConfigError(f"class_counts needs at least 2 classes, got {counts.tolist()}")
    if not torch.isfinite(counts).all() or (counts <= 0).any():
        raise ConfigError(
            f"class_counts must be finite and > 0 for every class, got {counts.tolist()} "
            "(a class without training samples cannot be weighted; drop it or add samples)"
        )
    return counts / counts.sum()


def reduce_loss(per_sample: Tensor, reduction: str) -> Tensor:
    """Reduce a per-sample loss vector ``(B,)`` with ``reduction`` in :data:`REDUCTIONS`."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


class ImbalanceLoss(nn.Module):
    """Base class: validates inputs, holds the reduction and the training progress ``t`` in [0, 1].

    ``set_progress`` is a no-op for static losses; schedule-aware losses (A-CBFL) read
    :attr:`progress`. Subclasses implement :meth:`per_sample` on float32 logits.
    """

    def __init__(self, num_classes: int, reduction: str = "mean") -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.num_classes = int(num_classes)
        self.reduction = reduction
        self.progress = 0.0

    def set_progress(self, t: float) -> None:
        """Set training progress ``t`` (0 = start, 1 = end); values outside [0, 1] are clipped."""
        t = float(t)
        if t != t:  # NaN would silently poison every schedule downstream
            raise ConfigError("training progress must be a number in [0, 1], got NaN")
        self.progress = min(max(t, 0.0), 1.0)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Per-sample loss ``(B,)`` for float32 ``logits`` ``(B, C)`` and long ``target`` ``(B,)``."""
        raise NotImplementedError

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``logits`` ``(B, C)`` against integer labels ``target`` ``(B,)``, reduced."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ConfigError(
                f"{type(self).__name__}: logits must have shape (B, {self.num_classes}), "
                f"got {tuple(logits.shape)}"
            )
        if target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ConfigError(
                f"{type(self).__name__}: target must have shape ({logits.shape[0]},), "
                f"got {tuple(target.shape)}"
            )
        if target.is_floating_point():
            raise ConfigError(f"{type(self).__name__}: target must hold integer class indices")
        buf = next(self.buffers(), None)
        if buf is not None and buf.device != logits.device:
            # Losses are often built once from CPU counts and never moved; follow the logits.
            self.to(logits.device)
        # float32 whatever the autocast dtype: log-probabilities of rare classes underflow in fp16.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            per_sample = self.per_sample(logits.float(), target.long())
        return reduce_loss(per_sample, self.reduction)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, reduction={self.reduction!r}"
