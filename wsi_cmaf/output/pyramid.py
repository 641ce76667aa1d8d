"""2×2 pooling used to build the heatmap store's pyramid levels (NaN-aware mean, max), and the
writer of a (C, y, x) image group's NaN-mean levels."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["nan_mean_pool2", "max_pool2", "write_nan_mean_levels"]


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


def drop_levels(group: Any, levels: int) -> None:
    """Delete the arrays ``str(level)`` with ``level >= levels`` of a zarr ``group`` (left over from an
    earlier, deeper pyramid)."""
    for name in list(group.array_keys()):
        if name.isdigit() and int(name) >= levels:
            del group[name]


def write_nan_mean_levels(group: Any, level0: np.ndarray, levels: int, chunk: tuple[int, int], *,
                          compressors: Any, dimension_names: tuple[str, ...], first: int = 0) -> None:
    """Write arrays ``str(level)`` for ``first <= level < levels`` of a zarr ``group``: ``level0``
    (C, H, W) pooled by :func:`nan_mean_pool2` once per level, float32, NaN fill, chunks of
    ``(C, chunk)`` clipped to each level's size. ``first=1`` when level 0 is already stored."""
    data = level0
    for level in range(levels):
        if level:
            data = nan_mean_pool2(data)
        if level < first:
            continue
        h, w = data.shape[-2:]
        arr = group.create_array(str(level), shape=data.shape,
                                 chunks=(data.shape[0], max(1, min(chunk[0], h)), max(1, min(chunk[1], w))),
                                 dtype="float32", fill_value=np.nan, compressors=compressors,
                                 dimension_names=dimension_names, overwrite=True)
        arr[...] = data
