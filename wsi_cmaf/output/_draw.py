"""Raster drawing helpers for the overlay PNG (numpy + PIL, no matplotlib figure).

Everything works on the map's own pixel grid: masks are looked up per canvas pixel with
index arrays (nearest neighbour), outlines are the boundary pixels of those masks, and
blending is one vectorised pass. That is what makes the overlay cost tens of milliseconds
instead of a matplotlib render.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import ImageDraw, ImageFont

logger = logging.getLogger(__name__)

#: Default colour ramp, p = 0 -> 1: dark green -> green -> yellow-green -> yellow.
#: Why these hues: H&E is pink (eosin, hue ~330-350°) and purple/blue (haematoxylin,
#: ~260-280°). Hues 55-150° (yellow, green) sit opposite them on the colour wheel, so a
#: semi-transparent blend over tissue turns olive, never the magenta/salmon that inferno or
#: jet give over eosin; blue/cyan is avoided too, since over pink it blends to the
#: lavender of haematoxylin. Luminance rises monotonically with p, so the ramp also reads in
#: greyscale and for red-green colour-blind viewers (yellow stays the brightest).
RAMP_STOPS = ((0.0, (0, 80, 60)), (0.4, (20, 150, 70)), (0.7, (140, 210, 40)), (1.0, (255, 240, 0)))
DEFAULT_CMAP = "teal-yellow"
#: thresholded mode: one colour for every tile at or above the threshold
THRESHOLD_COLOUR = (0, 215, 80)  # green: over eosin pink it turns grey-green; yellow turned orange
#: thresholded mode's opacity, as a share of ``alpha``: the tissue under a flagged tile stays readable
THRESHOLD_OPACITY = 0.55
TISSUE_LINE = (20, 20, 20)
FAILED_COLOUR = (230, 30, 50)
HE_PINK = (228, 160, 205)  # a typical eosin-stained tissue colour, for the "on tissue" colour bar
BANNER_COLOUR = (214, 72, 0)


def colour_lut(cmap: str) -> np.ndarray:
    """(256, 3) uint8 colours of ``cmap``: the default ramp, or any matplotlib colour map name."""
    if cmap == DEFAULT_CMAP:
        xs = np.linspace(0.0, 1.0, 256)
        stops = np.array([s for s, _ in RAMP_STOPS])
        cols = np.array([c for _, c in RAMP_STOPS], dtype=float)
        return np.stack([np.interp(xs, stops, cols[:, i]) for i in range(3)], axis=1).round().astype(np.uint8)
    from matplotlib import colormaps  # only for a non-default map: keeps matplotlib off the fast path

    from wsi_cmaf.errors import OutputError

    if cmap not in colormaps:
        raise OutputError(f"unknown colour map {cmap!r}: use {DEFAULT_CMAP!r} or a matplotlib colour map name")
    return (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def opacity(p: np.ndarray, alpha: float) -> np.ndarray:
    """Opacity rising with probability: ``alpha`` at p = 1, 8 % of it at p = 0, quadratic between.

    Quadratic so that low and middling probabilities leave the H&E readable (a faint tint
    says the tile was analysed) while high probabilities stand out; NaN (no value) is fully
    transparent.
    """
    q = np.clip(p, 0.0, 1.0)
    a = alpha * (0.08 + 0.92 * q * q)
    return np.where(np.isfinite(p), a, 0.0).astype(np.float32)


def blend(base: np.ndarray, colour: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``base`` (H, W, 3 uint8) with ``colour`` (H, W, 3 or 3) laid over at opacity ``a`` (H, W)."""
    out = base.astype(np.float32)
    out += (np.asarray(colour, np.float32) - out) * a[..., None]
    return out.round().astype(np.uint8)


def blend_where(base: np.ndarray, where: np.ndarray, colour: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``base`` with ``colour`` (N, 3 or 3) over it at opacity ``a`` (N,) on the N pixels of ``where``.

    Only the tinted pixels are touched (usually the tissue: a fraction of the map).
    """
    out = base.copy()
    sub = out[where].astype(np.float32)
    sub += (np.asarray(colour, np.float32) - sub) * np.asarray(a, np.float32)[:, None]
    out[where] = (sub + 0.5).astype(np.uint8)
    return out


def edges(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Inner boundary pixels of ``mask`` (bool), ``width`` pixels thick."""
    m = np.asarray(mask, bool)
    if not m.any():
        return m.copy()
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    edge = m & ~inner
    for _ in range(max(0, width - 1)):  # thicken inwards so the line never covers outside pixels
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown & m
    return edge


def hatch(shape: tuple[int, int], period: int, width: int) -> np.ndarray:
    """bool (H, W): diagonal hatching lines ``width`` px wide every ``period`` px."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx + yy) % max(1, period) < width


def lookup(index_rows: np.ndarray, index_cols: np.ndarray, grid: np.ndarray, fill) -> np.ndarray:
    """``grid`` sampled at every (row, col) pair of the two index vectors; -1 indices give ``fill``."""
    out = grid[np.clip(index_rows, 0, None)[:, None], np.clip(index_cols, 0, None)[None, :]]
    bad = (index_rows < 0)[:, None] | (index_cols < 0)[None, :]
    if bad.any():
        out = np.where(bad, fill, out)
    return out


def cell_index(centres: np.ndarray, start: float, step: float, n: int) -> np.ndarray:
    """Index of the cell ``[start + i*step, start + (i+1)*step)`` holding each centre; -1 outside."""
    if n == 0 or step <= 0:
        return np.full(centres.shape, -1, dtype=np.int64)
    i = np.floor((centres - start) / step).astype(np.int64)
    i[(i < 0) | (i >= n)] = -1
    return i


@cache
def _font_path(bold: bool) -> str | None:
    # DejaVu (matplotlib's bundled font) has µ, ≥ and —; found without importing matplotlib.
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf" / (
        "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return str(path) if path.is_file() else None


@lru_cache(maxsize=64)
def font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A TrueType font of ``size`` px (DejaVu Sans when available, else Pillow's default)."""
    path = _font_path(bold)
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError as exc:
            logger.debug("cannot load %s (%s); using Pillow's default font", path, exc)
    return ImageFont.load_default(size=size)


def text_box(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fnt, *,
             fill=(0, 0, 0), background=(255, 255, 255), pad: int = 4, anchor: str = "la") -> tuple[int, ...]:
    """Draw ``text`` on a filled box; returns the box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=fnt, anchor=anchor)
    box = (int(x0 - pad), int(y0 - pad), int(x1 + pad), int(y1 + pad))
    draw.rectangle(box, fill=background)
    draw.text(xy, text, font=fnt, fill=fill, anchor=anchor)
    return box


def nice_length(span: float) -> float:
    """Largest 1/2/5 × 10^k not above ``span`` (for the scale bar)."""
    if span <= 0:
        return 1.0
    k = np.floor(np.log10(span))
    for m in (5, 2, 1):
        if m * 10 ** k <= span:
            return float(m * 10 ** k)
    return float(10 ** k)
