"""Pixel helpers shared by the slide backends: level origins, RGBA compositing, clipped reads."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PAD_VALUE", "composite_straight_rgba", "level_origin", "pad_beyond", "paste_clipped"]

#: Value of every channel of a pixel beyond the slide's edge: white, as OpenSlide renders its
#: transparent outside (composited on white) and as the tiffslide backend whitens its zero padding.
#: Tiles that reach past the slide are set to it explicitly (:func:`pad_beyond`), whatever a backend did.
PAD_VALUE = 255


def level_origin(location: tuple[int, int], downsample: float) -> tuple[int, int]:
    """Level-0 location -> top-left pixel in a level (same rule as OpenSlide/tiffslide)."""
    return int(location[0] / downsample), int(location[1] / downsample)


def composite_straight_rgba(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA on white -> RGB uint8."""
    alpha = rgba[..., 3]
    rgb = np.ascontiguousarray(rgba[..., :3])
    if alpha.min() == 255:
        return rgb
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def paste_clipped(
    read: Any, origin: tuple[int, int], size: tuple[int, int], level_dims: tuple[int, int]
) -> np.ndarray:
    """Read the in-bounds part of a level window with ``read(x, y, w, h)`` and pad with white.

    ``origin`` and ``size`` are in level pixels; ``read`` returns RGB uint8 for an
    in-bounds rectangle. White padding matches OpenSlide (transparent -> white).
    """
    w, h = size
    x0, y0 = origin
    lw, lh = level_dims
    if x0 >= 0 and y0 >= 0 and x0 + w <= lw and y0 + h <= lh:
        return read(x0, y0, w, h)
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + w, lw), min(y0 + h, lh)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = read(cx0, cy0, cx1 - cx0, cy1 - cy0)
    return out


def pad_beyond(tiles: np.ndarray, inside_w: np.ndarray, inside_h: np.ndarray, value: int = PAD_VALUE) -> np.ndarray:
    """Set the pixels of ``tiles`` (N, h, w, C) right of ``inside_w[i]`` / below ``inside_h[i]`` to ``value``.

    ``inside_w``/``inside_h`` (N,) are how many pixel columns/rows of each tile lie inside the
    slide. Returns ``tiles`` itself (a copy when it was read-only); untouched when no tile reaches out.
    """
    h, w = tiles.shape[1:3]
    inside_w, inside_h = np.asarray(inside_w), np.asarray(inside_h)
    if tiles.shape[0] == 0 or ((inside_w >= w).all() and (inside_h >= h).all()):
        return tiles
    if not tiles.flags.writeable:
        tiles = tiles.copy()
    out_x = np.arange(w)[None, :] >= inside_w[:, None]  # (N, w)
    out_y = np.arange(h)[None, :] >= inside_h[:, None]  # (N, h)
    tiles[out_y[:, :, None] | out_x[:, None, :]] = value
    return tiles
