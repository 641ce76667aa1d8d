"""Block windows of device-side decoding, and the tiles cut from them on the device.

The CPU block path (:func:`~wsi_cmaf.slide.reads.read_block`, :mod:`wsi_cmaf.slide.reads`) reads
each strip of a block's tissue tiles as one level window,
resizes it to the target grid with Pillow (antialiased bilinear with a sub-pixel box) when the
level's µm/px is not the target's, cuts the tiles and pads what lies beyond the slide. Here the
same strips and windows are planned (:func:`block_windows`), but only the storage tiles whose
pixels some tissue tile uses are listed for decoding, and :func:`cut_strip` repeats the resize,
the cut and the padding with torch on whatever device holds the decoded window.

:func:`pil_bilinear` is Pillow's own resampling (``ImagingResample``: float coefficients made in
the same order, rounded to 22-bit fixed point, a horizontal then a vertical pass, each rounded to
uint8), written with int32 tensor arithmetic, so on identical input it gives Pillow's pixels
exactly, on CPU and CUDA alike.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from wsi_cmaf.slide._pixels import PAD_VALUE
from wsi_cmaf.slide.level0 import level0_tile_px
from wsi_cmaf.slide.reads import _tile_shape, plan_reads

if TYPE_CHECKING:
    from wsi_cmaf.slide.grid import Block, TileGrid
    from wsi_cmaf.slide.jpeg_tiles import JpegLevel

__all__ = ["StripWindow", "block_windows", "cut_strip", "pil_bilinear"]

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images (Resample.c)


@dataclass(frozen=True)
class StripWindow:
    """One strip ``(r0, r1, c0, c1)`` of a block: its tissue tiles (global ``rows``/``cols``), the
    level window ``box`` (x0, y0, x1, y1) the CPU path reads for it, and the storage tiles
    (``needed``) that hold pixels those tiles use."""

    strip: tuple[int, int, int, int]
    rows: np.ndarray
    cols: np.ndarray
    box: tuple[int, int, int, int]
    needed: tuple[int, ...]


def _kind(grid: TileGrid) -> str:
    if grid.config.source == "level0" and not grid.exact:
        return "level0"
    return "crop" if grid.exact else "resize"


def _margins(grid: TileGrid) -> tuple[int, int]:
    # the resampling filter's reach, as reads.read_target_window adds it
    sx, sy = grid.level_scale
    return math.ceil(sx) + 1, math.ceil(sy) + 1


def _footprints(grid: TileGrid, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(N, 4) level-px boxes (x0, y0, x1, y1) of the pixels each tile's read uses."""
    t, step = grid.config.tile_size, grid.config.step
    kind = _kind(grid)
    if kind == "level0":
        w0, h0 = level0_tile_px(t, grid.config.mpp, grid.slide_mpp)
        xy = np.array([grid.tile_location(int(r), int(c)) for r, c in zip(rows, cols)], np.int64).reshape(-1, 2)
        return np.stack([xy[:, 0], xy[:, 1], xy[:, 0] + w0, xy[:, 1] + h0], axis=1)
    x, y = cols.astype(np.int64) * step, rows.astype(np.int64) * step
    if kind == "crop":
        return np.stack([x, y, x + t, y + t], axis=1)
    (sx, sy), (mx, my) = grid.level_scale, _margins(grid)
    return np.stack([np.maximum(0, np.floor(x * sx).astype(np.int64) - mx),
                     np.maximum(0, np.floor(y * sy).astype(np.int64) - my),
                     np.ceil((x + t) * sx).astype(np.int64) + mx,
                     np.ceil((y + t) * sy).astype(np.int64) + my], axis=1)


def _window_box(grid: TileGrid, strip: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    r0, r1, c0, c1 = strip
    t, step = grid.config.tile_size, grid.config.step
    kind = _kind(grid)
    if kind == "level0":
        w0, h0 = level0_tile_px(t, grid.config.mpp, grid.slide_mpp)
        (x0, y0), (x1, y1) = grid.tile_location(r0, c0), grid.tile_location(r1, c1)
        return x0, y0, x1 + w0, y1 + h0
    tx, ty = c0 * step, r0 * step
    width, height = (c1 - c0) * step + t, (r1 - r0) * step + t
    if kind == "crop":
        return tx, ty, tx + width, ty + height
    (sx, sy), (mx, my) = grid.level_scale, _margins(grid)
    return (max(0, math.floor(tx * sx) - mx), max(0, math.floor(ty * sy) - my),
            math.ceil((tx + width) * sx) + mx, math.ceil((ty + height) * sy) + my)


def _needed_tiles(level: JpegLevel, boxes: np.ndarray) -> tuple[int, ...]:
    """Storage tiles (raster order) of ``level`` that the level-px ``boxes`` (N, 4) meet."""
    (lw, lh), (tw, th) = level.size, level.tile
    x0, y0 = np.clip(boxes[:, 0], 0, lw), np.clip(boxes[:, 1], 0, lh)
    x1, y1 = np.clip(boxes[:, 2], 0, lw), np.clip(boxes[:, 3], 0, lh)
    inside = (x1 > x0) & (y1 > y0)
    if not inside.any():
        return ()
    c0, c1 = x0[inside] // tw, (x1[inside] - 1) // tw
    r0, r1 = y0[inside] // th, (y1[inside] - 1) // th
    mark = np.zeros((level.down, level.across), bool)
    for a, b, c, d in zip(r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist()):
        mark[a:b + 1, c:d + 1] = True
    rr, cc = np.nonzero(mark)
    return tuple(int(i) for i in rr * level.across + cc)


def block_windows(grid: TileGrid, block: Block, level: JpegLevel,
                  call_overhead_px: float | None) -> list[StripWindow]:
    """The strips the CPU path reads ``block`` in (same :func:`plan_reads` call), with their windows
    and needed storage tiles. ``call_overhead_px``: the block reader's (None: one strip)."""
    rows, cols = grid.tissue_indices(block)
    if rows.size == 0:
        return []
    t, step = grid.config.tile_size, grid.config.step
    if call_overhead_px is None:
        strips = [(int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()))]
    else:
        strips = plan_reads(rows, cols, t, step, float(call_overhead_px))
    out = []
    for strip in strips:
        sel = (rows >= strip[0]) & (rows <= strip[1])
        r, c = rows[sel], cols[sel]
        out.append(StripWindow(strip, r, c, _window_box(grid, strip), _needed_tiles(level, _footprints(grid, r, c))))
    return out


@functools.lru_cache(maxsize=1024)
def _coefficients(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear ``precompute_coeffs`` + ``normalize_coeffs_8bpc``: first input index
    (out,) and fixed-point weights (out, ksize) of each output pixel."""
    # Pillow takes the box as C floats: the span is a float difference, then widened to double
    f0, f1 = np.float32(in0), np.float32(in1)
    scale = float(f1 - f0) / out_size
    in0 = float(f0)
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    center = in0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    taps = np.arange(ksize)
    arg = np.abs(((xmin[:, None] + taps[None, :]).astype(np.float64) - center[:, None] + 0.5) * ss)
    w = np.where((arg < 1.0) & (taps[None, :] < (xmax - xmin)[:, None]), 1.0 - arg, 0.0)
    ww = np.cumsum(w, axis=1)[:, -1]  # cumsum adds left to right, as Pillow's loop does
    k = np.divide(w, ww[:, None], out=w.copy(), where=ww[:, None] != 0.0)
    kk = np.trunc(0.5 + k * (1 << _PRECISION_BITS)).astype(np.int32)  # weights are >= 0
    return xmin, kk


def _resample_pass(x: torch.Tensor, dim: int, box: tuple[float, float], out_size: int) -> torch.Tensor:
    """One of Pillow's passes along ``dim`` of int32 (H, W, C) ``x``; int32 in [0, 255] back."""
    n_in = x.shape[dim]
    xmin, kk = _coefficients(n_in, float(box[0]), float(box[1]), int(out_size))
    index = torch.from_numpy(np.minimum(xmin[:, None] + np.arange(kk.shape[1])[None, :], n_in - 1)).to(x.device)
    weight = torch.from_numpy(kk).to(x.device)
    shape = [1, 1, 1]
    shape[dim] = out_size
    acc = torch.full([out_size if d == dim else s for d, s in enumerate(x.shape)], 1 << (_PRECISION_BITS - 1),
                     dtype=torch.int32, device=x.device)
    for k in range(kk.shape[1]):  # products <= 255 * 2**22 and their sum stay inside int32
        acc.add_(x.index_select(dim, index[:, k]) * weight[:, k].view(shape))
    return acc.bitwise_right_shift_(_PRECISION_BITS).clamp_(0, 255)


def pil_bilinear(window: torch.Tensor, box: tuple[float, float, float, float], size: tuple[int, int]) -> torch.Tensor:
    """``Image.fromarray(window).resize(size, BILINEAR, box=box)`` on ``window``'s device.

    ``window``: uint8 (H, W, 3); ``box`` (x0, y0, x1, y1) in window px; ``size`` (w, h).
    """
    x = window.to(torch.int32)
    x = _resample_pass(x, 1, (box[0], box[2]), size[0])
    x = _resample_pass(x, 0, (box[1], box[3]), size[1])
    return x.to(torch.uint8)


def _pad(tiles: torch.Tensor, inside_w: np.ndarray, inside_h: np.ndarray) -> torch.Tensor:
    """:func:`~wsi_cmaf.slide._pixels.pad_beyond` for a tensor (in place)."""
    h, w = tiles.shape[1:3]
    if tiles.shape[0] == 0 or ((inside_w >= w).all() and (inside_h >= h).all()):
        return tiles
    out_x = np.arange(w)[None, :] >= inside_w[:, None]
    out_y = np.arange(h)[None, :] >= inside_h[:, None]
    mask = torch.from_numpy(out_y[:, :, None] | out_x[:, None, :]).to(tiles.device)
    return tiles.masked_fill_(mask[..., None], PAD_VALUE)


def _gather(canvas: torch.Tensor, y: np.ndarray, x: np.ndarray, h: int, w: int) -> torch.Tensor:
    """(N, h, w, 3) crops of ``canvas`` at top-lefts (y[i], x[i]), one indexing kernel."""
    dev = canvas.device
    iy = torch.from_numpy(y[:, None] + np.arange(h)[None, :]).to(dev)
    ix = torch.from_numpy(x[:, None] + np.arange(w)[None, :]).to(dev)
    return canvas[iy[:, :, None], ix[:, None, :]]


def cut_strip(grid: TileGrid, win: StripWindow, canvas: torch.Tensor) -> torch.Tensor:
    """The strip's tiles (N, h, w, 3) uint8 from its decoded level window ``canvas`` (the pixels of
    ``win.box``, white beyond the level), resized, cut and padded as the CPU path does."""
    r0, r1, c0, c1 = win.strip
    t, step = grid.config.tile_size, grid.config.step
    kind = _kind(grid)
    if kind == "level0":
        h0, w0 = _tile_shape(grid)
        xy = np.array([grid.tile_location(int(r), int(c)) for r, c in zip(win.rows, win.cols)], np.int64).reshape(-1, 2)
        tiles = _gather(canvas, xy[:, 1] - win.box[1], xy[:, 0] - win.box[0], h0, w0)
        W0, H0 = grid.level0_size
        return _pad(tiles, np.clip(W0 - xy[:, 0], 0, None), np.clip(H0 - xy[:, 1], 0, None))
    if kind == "resize":
        sx, sy = grid.level_scale
        tx, ty = c0 * step, r0 * step
        width, height = (c1 - c0) * step + t, (r1 - r0) * step + t
        lx0, ly0 = win.box[:2]
        box = (tx * sx - lx0, ty * sy - ly0, (tx + width) * sx - lx0, (ty + height) * sy - ly0)
        canvas = pil_bilinear(canvas, box, (width, height))
    y = (win.rows.astype(np.int64) - r0) * step
    x = (win.cols.astype(np.int64) - c0) * step
    tiles = _gather(canvas, y, x, t, t)
    ex, ey = grid.target_extent
    inside_w = math.ceil(ex - 1e-6) - win.cols.astype(np.int64) * step
    inside_h = math.ceil(ey - 1e-6) - win.rows.astype(np.int64) * step
    return _pad(tiles, inside_w, inside_h)
