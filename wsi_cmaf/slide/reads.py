"""Block and tile reads of a :class:`~wsi_cmaf.slide.grid.TileGrid`: the pixels behind the geometry.

:func:`read_block` reads a block's tissue tiles as one or a few row strips (:func:`plan_reads`);
each strip is ONE read of a target-grid window (:func:`read_target_window`: a plain crop of the
grid's level when its µm/px is the target's, else a resize of the level window to exactly the
target grid) from which the tiles are cut in memory. Level-0 grids that resample read each strip
as one level-0 window and return the tiles at their native size (:func:`read_strip_level0`).
:func:`read_tile` reads one tile on its own, the reference block reads are tested against. Target
pixels wholly beyond the slide edge are set to :data:`~wsi_cmaf.slide._pixels.PAD_VALUE` (partial
edge tiles, see :mod:`wsi_cmaf.slide.grid`). :func:`block_read_backend` picks the backend block
reads use.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from wsi_cmaf.slide._pixels import pad_beyond
from wsi_cmaf.slide.grid import Block, BlockTiles, TileGrid, level0_for_level_px
from wsi_cmaf.slide.level0 import level0_tile_px

if TYPE_CHECKING:
    from wsi_cmaf.slide.reader import SlideReader

logger = logging.getLogger(__name__)

__all__ = ["block_read_backend", "plan_reads", "read_block", "read_strip_level0", "read_target_window", "read_tile"]


def _pad_target_tiles(grid: TileGrid, tiles: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``tiles`` with their target pixels wholly beyond the slide set to :data:`PAD_VALUE`."""
    ex, ey = grid.target_extent
    step = grid.config.step
    # pixel i is wholly outside when i >= ceil(extent); the straddling one keeps its resampled blend
    inside_w = math.ceil(ex - 1e-6) - np.asarray(cols, np.int64) * step
    inside_h = math.ceil(ey - 1e-6) - np.asarray(rows, np.int64) * step
    return pad_beyond(tiles, inside_w, inside_h)


def read_target_window(reader: SlideReader, grid: TileGrid, ty: int, tx: int, height: int, width: int) -> np.ndarray:
    """Target-grid pixels [ty, ty+height) x [tx, tx+width) with one read_region call."""
    level, ds = grid.level, grid.level_downsample
    if grid.exact:
        loc = (level0_for_level_px(tx, ds), level0_for_level_px(ty, ds))
        return reader.read_region(loc, level, (width, height))
    sx, sy = grid.level_scale
    # Level-px window with a margin for the resampling filter's support, so tiles cut from a
    # block and tiles read alone see the same neighbouring pixels.
    mx_, my_ = math.ceil(sx) + 1, math.ceil(sy) + 1
    ax, ay, bx, by = tx * sx, ty * sy, (tx + width) * sx, (ty + height) * sy
    lx0, ly0 = max(0, math.floor(ax) - mx_), max(0, math.floor(ay) - my_)
    lx1, ly1 = math.ceil(bx) + mx_, math.ceil(by) + my_
    loc = (level0_for_level_px(lx0, ds), level0_for_level_px(ly0, ds))
    region = reader.read_region(loc, level, (lx1 - lx0, ly1 - ly0))
    image = Image.fromarray(region)
    box = (ax - lx0, ay - ly0, bx - lx0, by - ly0)
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR, box=box))


def plan_reads(rows: np.ndarray, cols: np.ndarray, tile: int, step: int,
               call_overhead_px: float) -> list[tuple[int, int, int, int]]:
    """Split a block's tissue tiles into row strips read with one call each.

    Returns ``(r0, r1, c0, c1)`` inclusive tile ranges. Minimises ``calls * call_overhead_px +
    decoded pixels`` over strips of consecutive tissue rows (exact dynamic programme, at most
    block_tiles² steps). With a large overhead (tiffslide, ~2 ms a call) this is the single
    bounding box; with OpenSlide, whose calls are cheap but whose decoding is slow, sparse tissue
    is read as a few strips instead of decoding the glass around it.
    """
    if rows.size == 0:
        return []
    urows = np.unique(rows)
    lo = np.array([cols[rows == r].min() for r in urows])
    hi = np.array([cols[rows == r].max() for r in urows])
    n = len(urows)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        cmin, cmax = lo[j - 1], hi[j - 1]
        for i in range(j, 0, -1):  # strip = tissue rows i-1 .. j-1
            cmin, cmax = min(cmin, lo[i - 1]), max(cmax, hi[i - 1])
            area = ((urows[j - 1] - urows[i - 1]) * step + tile) * ((cmax - cmin) * step + tile)
            cost = best[i - 1] + call_overhead_px + area
            if cost < best[j]:
                best[j], choice[j] = cost, i - 1
    strips = []
    j = n
    while j > 0:
        i = int(choice[j])
        strips.append((int(urows[i]), int(urows[j - 1]), int(lo[i:j].min()), int(hi[i:j].max())))
        j = i
    return strips[::-1]


def _read_strip(reader: SlideReader, grid: TileGrid, strip: tuple[int, int, int, int],
                rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Tiles (rows, cols) of one strip ``(r0, r1, c0, c1)``, cut from ONE read of its window."""
    r0, r1, c0, c1 = strip
    t, step = grid.config.tile_size, grid.config.step
    if grid.config.source == "level0" and not grid.exact:
        return read_strip_level0(reader, grid, strip, rows, cols)
    window = np.ascontiguousarray(read_target_window(reader, grid, r0 * step, c0 * step,
                                                      (r1 - r0) * step + t, (c1 - c0) * step + t))
    s0, s1, s2 = window.strides
    # View of every tile origin in the window (tiles may overlap when stride < tile size).
    views = np.lib.stride_tricks.as_strided(
        window, shape=(r1 - r0 + 1, c1 - c0 + 1, t, t, 3),
        strides=(s0 * step, s1 * step, s0, s1, s2), writeable=False,
    )
    # fancy indexing copies only the tissue tiles; partial edge tiles get explicit padding
    return _pad_target_tiles(grid, views[rows - r0, cols - c0], rows, cols)


def read_tile(reader: SlideReader, grid: TileGrid, row: int, col: int) -> np.ndarray:
    """One tile (t, t, 3) read on its own (reference for tests and naive loops)."""
    t, step = grid.config.tile_size, grid.config.step
    if grid.config.source == "level0" and not grid.exact:
        w0, h0 = level0_tile_px(t, grid.config.mpp, grid.slide_mpp)
        x, y = grid.tile_location(row, col)
        tile = np.ascontiguousarray(reader.read_region((x, y), 0, (w0, h0))[..., :3])
        return pad_level0(tile[None], grid, np.array([x]), np.array([y]))[0]
    tile = read_target_window(reader, grid, row * step, col * step, t, t)
    return _pad_target_tiles(grid, tile[None], np.array([row]), np.array([col]))[0]


def _tile_shape(grid: TileGrid) -> tuple[int, int]:
    """(height, width) of the tiles :func:`read_block` returns for ``grid``."""
    if grid.config.source == "level0" and not grid.exact:
        w0, h0 = level0_tile_px(grid.config.tile_size, grid.config.mpp, grid.slide_mpp)
        return (h0, w0)
    return (grid.config.tile_size, grid.config.tile_size)


def read_strip_level0(reader: SlideReader, grid: TileGrid, strip: tuple[int, int, int, int],
                      rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Tiles (rows, cols) of strip ``(r0, r1, c0, c1)`` as level-0 regions (N, h0, w0, 3), one read."""
    r0, r1, c0, c1 = strip
    w0, h0 = level0_tile_px(grid.config.tile_size, grid.config.mpp, grid.slide_mpp)
    x0, y0 = grid.tile_location(r0, c0)
    x1, y1 = grid.tile_location(r1, c1)
    window = reader.read_region((x0, y0), 0, (x1 - x0 + w0, y1 - y0 + h0))
    out = np.empty((rows.size, h0, w0, 3), np.uint8)
    xy = np.empty((rows.size, 2), np.int64)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        x, y = grid.tile_location(r, c)
        xy[i] = (x, y)
        out[i] = window[y - y0:y - y0 + h0, x - x0:x - x0 + w0, :3]
    return pad_level0(out, grid, xy[:, 0], xy[:, 1])


def pad_level0(tiles: np.ndarray, grid: TileGrid, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Level-0 regions ``tiles`` at level-0 top-lefts (x, y) with their part beyond the slide set
    to the padding value (partial edge tiles, see :mod:`wsi_cmaf.slide.grid`)."""
    W0, H0 = grid.level0_size
    return pad_beyond(tiles, np.clip(W0 - np.asarray(x), 0, None), np.clip(H0 - np.asarray(y), 0, None))


def read_block(reader: SlideReader, grid: TileGrid, block: Block) -> BlockTiles:
    """Tissue tiles of ``block``, cut in memory from as few reads as pay off.

    One ``read_region`` of the tissue tiles' bounding box, unless the reader says its calls are
    cheap relative to decoding (``call_overhead_px``, OpenSlide): then :func:`plan_reads` may
    split sparse tissue into a few row strips. Readers without that attribute get one read.
    """
    rows, cols = grid.tissue_indices(block)
    t, step = grid.config.tile_size, grid.config.step
    if rows.size == 0:
        return BlockTiles(block, np.zeros((0, *_tile_shape(grid), 3), np.uint8), rows, cols)
    overhead = getattr(reader, "call_overhead_px", None)
    if overhead is None:
        strips = [(int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()))]
    else:
        strips = plan_reads(rows, cols, t, step, float(overhead))
    if len(strips) == 1:  # the common case: no extra copy into a gathered array
        return BlockTiles(block, _read_strip(reader, grid, strips[0], rows, cols), rows, cols)
    tiles = np.empty((rows.size, *_tile_shape(grid), 3), np.uint8)
    for strip in strips:
        sel = (rows >= strip[0]) & (rows <= strip[1])
        tiles[sel] = _read_strip(reader, grid, strip, rows[sel], cols[sel])
    return BlockTiles(block, tiles, rows, cols)


def block_read_backend(reader: SlideReader) -> str:
    """The backend block reads should use for ``reader``'s file.

    OpenSlide pays ~20-25 ns per pixel even for tiles in its cache (measured: a cached 512 px
    tile takes ~6 ms, libjpeg-turbo decodes it in ~1.4 ms), so for large block reads tiffslide,
    which decodes TIFF tiles straight into the output array, is 1.5-2x faster. When OpenSlide
    opened the file and tiffslide reads the same pyramid (same level sizes and downsamples), blocks
    are read with tiffslide; otherwise with the reader's own backend. Metadata (µm/px, vendor,
    associated images) always come from the backend that opened the slide.
    """
    if reader.backend != "openslide":
        return reader.backend
    from wsi_cmaf.errors import WsiCmafError
    from wsi_cmaf.slide.reader import open_slide

    try:
        # the reader's own µm/px as the override: a made-up one would be logged as disagreeing with the file
        mpp = reader.mpp if getattr(reader, "has_mpp", False) else 1.0
        with open_slide(reader.path, backend="tiffslide", mpp=mpp) as other:
            same = (other.level_dimensions == reader.level_dimensions
                    and all(abs(a - b) < 1e-6 * max(a, 1.0)
                            for a, b in zip(other.level_downsamples, reader.level_downsamples)))
    except WsiCmafError as exc:
        logger.debug("tiffslide cannot read %s (%s); blocks are read with openslide", reader.path, exc)
        return reader.backend
    return "tiffslide" if same else reader.backend
