"""2×2 pooling used to build the heatmap store's pyramid levels (NaN-aware mean, max)."""

from __future__ import annotations

import numpy as np

__all__ = ["nan_mean_pool2", "max_pool2"]


def nan_mean_pool2(data: np.ndarray) -> np.ndarray:
    """2×2 mean pooling over the last two axes, ignoring NaN; odd edges pool what exists.

    A window with no finite value stays NaN, so "no tissue" survives downsampling.
    """
    h, w = data.shape[-2:]
    pad = [(0, 0)] * (data.ndim - 2) + [(0, h % 2), (0, w % 2)]
    d = np.pad(data.astype(np.float64), pad, constant_values=np.nan)
    d = d.reshape(*d.shape[:-2], d.shape[-2] // 2, 2, d.shape[-1] // 2, 2)
    finite = np.isfinite(d)
    total = np.where(finite, d, 0.0).sum(axis=(-3, -1))
    count = finite.sum(axis=(-3, -1))
    out = np.full(total.shape, np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out.astype(np.float32)


def max_pool2(data: np.ndarray) -> np.ndarray:
    """2×2 max pooling over the last two axes (odd edges padded with 0)."""
    h, w = data.shape[-2:]
    pad = [(0, 0)] * (data.ndim - 2) + [(0, h % 2), (0, w % 2)]
    d = np.pad(data, pad)
    return d.reshape(*d.shape[:-2], d.shape[-2] // 2, 2, d.shape[-1] // 2, 2).max(axis=(-3, -1))
