"""Pixel helpers shared by the slide backends: level origins, RGBA compositing, clipped reads."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["composite_straight_rgba", "level_origin", "paste_clipped"]


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
