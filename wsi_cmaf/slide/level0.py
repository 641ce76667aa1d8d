"""Level-0 tile reads for grids with ``GridConfig.source == "level0"`` (WSInfer's pixels).

WSInfer reads every patch as a region of ``tile_size * mpp / slide_mpp`` px at full resolution
and lets the model's transform shrink it. This module reproduces those regions block-wise: ONE
level-0 read per strip of tiles, tiles cut from it in memory at their level-0 locations (the
same integers :meth:`TileGrid.tile_location` reports) and returned at their native size; the
resize to the model input happens batched on the device (:class:`~wsi_cmaf.infer.runner.TilePreprocessor`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wsi_cmaf.slide.grid import TileGrid
    from wsi_cmaf.slide.reader import SlideReader

logger = logging.getLogger(__name__)

#: Largest side (level-0 px) of one block's window in level-0 mode; a 32-tile block of 800 px
#: regions (50 px at 4 µm/px on a 0.25 µm/px slide) would otherwise be a 2 GB read.
MAX_LEVEL0_WINDOW_PX = 4096


def level0_tile_px(tile_size: int, mpp: float, slide_mpp: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in level-0 px of one tile's region, rounded as WSInfer rounds it."""
    return (max(1, int(round(tile_size * mpp / slide_mpp[0]))), max(1, int(round(tile_size * mpp / slide_mpp[1]))))


def block_tiles_for_level0(block_tiles: int, tile_size: int, mpp: float, slide_mpp: tuple[float, float],
                           max_window_px: int = MAX_LEVEL0_WINDOW_PX) -> int:
    """``block_tiles`` reduced so a block's level-0 window stays within ``max_window_px`` a side."""
    side = max(level0_tile_px(tile_size, mpp, slide_mpp))
    return max(1, min(block_tiles, max_window_px // side))


def read_strip_level0(reader: SlideReader, grid: TileGrid, strip: tuple[int, int, int, int],
                      rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Tiles (rows, cols) of strip ``(r0, r1, c0, c1)`` as level-0 regions (N, h0, w0, 3), one read."""
    r0, r1, c0, c1 = strip
    w0, h0 = level0_tile_px(grid.config.tile_size, grid.config.mpp, grid.slide_mpp)
    x0, y0 = grid.tile_location(r0, c0)
    x1, y1 = grid.tile_location(r1, c1)
    window = reader.read_region((x0, y0), 0, (x1 - x0 + w0, y1 - y0 + h0))
    out = np.empty((rows.size, h0, w0, 3), np.uint8)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        x, y = grid.tile_location(r, c)
        out[i] = window[y - y0:y - y0 + h0, x - x0:x - x0 + w0, :3]
    return out
