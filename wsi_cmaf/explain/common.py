"""Shared helpers for the explain package: errors, targets, eval mode, resizing to tile size."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsi_cmaf.errors import ModelError


class ExplainError(ModelError):
    """An explanation cannot be computed for this model or input."""


class NotCMAFNetError(ExplainError, TypeError):
    """A CMAF-Net-specific map was asked of another architecture."""


Target = int | torch.Tensor | None


def check_batch(x: torch.Tensor) -> None:
    """Raise :class:`ExplainError` unless ``x`` is a (B, 3, H, W) float batch."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ExplainError(f"expected a float (B, C, H, W) batch of preprocessed tiles, got "
                           f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate with dropout / VIB sampling off, restoring the caller's mode afterwards."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def resolve_target(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The class to explain per sample: given, or the model's predicted class when None."""
    if target is None:
        with torch.no_grad():
            return model(x).argmax(dim=1)
    if isinstance(target, int):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    return target.to(device=x.device, dtype=torch.long)


def to_tile(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, h, w) or (B, K, h, w) maps -> numpy float32 at tile resolution, bilinearly resized."""
    squeeze = maps.ndim == 3
    m = maps.unsqueeze(1) if squeeze else maps
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
    m = m.squeeze(1) if squeeze else m
    return m.detach().float().cpu().numpy()


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s wrapper, if any."""
    return getattr(model, "_orig_mod", model)
