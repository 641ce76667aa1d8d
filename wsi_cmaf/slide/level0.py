"""Level-0 tile geometry for grids with ``GridConfig.source == "level0"`` (WSInfer's pixels).

**Placement, as WSInfer 0.6.1 places patches** (``wsinfer.patchlib.segment_and_patch_one_slide``
and ``get_patch_coordinates_within_polygon``): with ``m = (mpp_x + mpp_y) / 2`` the slide's mean
µm/px, a patch is ``P = round(patch_size_pixels * spacing_um_px / m)`` level-0 px square (Python's
``round``: halves to even), patches step by ``S = round((1 - overlap) * P)`` level-0 px, and patch
``k`` along an axis starts at level-0 px ``k * S``: one rounding per slide, so corners never drift
from a whole-pixel lattice. WSInfer reads each ``P x P`` region at level 0 and lets the model's
``Resize`` shrink it. :func:`wsinfer_level0_px` computes ``(P, S)``; a level-0 grid uses that
lattice (:meth:`TileGrid.tile_location` returns ``(c * S, r * S)``) and describes it with its
*effective* µm/px ``P * m / tile_size`` (:func:`level0_grid_config`), so every conversion from
grid index to level-0 px or µm (store geometry, GeoJSON, tile table) reproduces the lattice on
slides with square pixels. (A grid with ``round(k * pitch)`` corners would drift by up to half a
pixel from WSInfer's: 224 px at 0.5 µm/px on a 0.499 µm/px slide has pitch 224.449 px.)

Which patches exist is not WSInfer's (it keeps patches whose centre lies in its tissue polygon;
wsi-cmaf thresholds each tile's tissue fraction and pads partial edge tiles), but every patch both
keep has the same corner, so they can be compared by grid index.

Reads (:func:`~wsi_cmaf.slide.reads.read_strip_level0`) are block-wise: ONE level-0 read per
strip of tiles, tiles cut from it in memory at their level-0 locations and returned at their
native size; the resize to the model input happens batched on the device
(:class:`~wsi_cmaf.preprocess.TilePreprocessor`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from wsi_cmaf.errors import ConfigError

if TYPE_CHECKING:
    from wsi_cmaf.slide.grid import GridConfig

logger = logging.getLogger(__name__)

#: Largest side (level-0 px) of one block's window in level-0 mode; a 32-tile block of 800 px
#: regions (50 px at 4 µm/px on a 0.25 µm/px slide) would otherwise be a 2 GB read.
MAX_LEVEL0_WINDOW_PX = 4096


def wsinfer_level0_px(tile_size: int, mpp: float, slide_mpp: tuple[float, float],
                      step: int | None = None) -> tuple[int, int]:
    """(patch, stride) in level-0 px, computed as WSInfer 0.6.1 computes them.

    ``patch = round(tile_size * mpp / mean(slide_mpp))``; ``stride = patch`` for non-overlapping
    tiles (``step`` None or ``tile_size``), else ``round(step / tile_size * patch)`` (WSInfer's
    ``round((1 - overlap) * patch)`` with ``overlap = 1 - step / tile_size``). Python's ``round``
    (halves to even) is WSInfer's rounding too.
    """
    mean = (float(slide_mpp[0]) + float(slide_mpp[1])) / 2
    patch = max(1, round(tile_size * mpp / mean))
    if step is None or step == tile_size:
        return patch, patch
    return patch, max(1, round(step * patch / tile_size))


def level0_tile_px(tile_size: int, mpp: float, slide_mpp: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in level-0 px of one tile's region: WSInfer's square ``P x P`` patch."""
    patch, _ = wsinfer_level0_px(tile_size, mpp, slide_mpp)
    return patch, patch


def level0_grid_config(config: GridConfig, slide_mpp: tuple[float, float]) -> GridConfig:
    """``config`` (``source="level0"``) with ``mpp`` set to the grid's effective µm/px on this slide.

    The effective µm/px is ``P * mean(slide_mpp) / tile_size``: a tile's ``tile_size`` px then
    span exactly its ``P`` level-0 px, and ``k * step`` tile px are ``k * S`` level-0 px, so
    the grid's geometry (shape, tissue fractions, stored scale and translation) describes the
    tiles actually read. Idempotent: the effective config maps to itself. ConfigError when an
    explicit ``stride`` is not a whole number of level-0 px on this slide (the recorded geometry
    could not describe WSInfer's rounded stride).
    """
    patch, stride = wsinfer_level0_px(config.tile_size, config.mpp, slide_mpp, config.stride)
    if stride * config.tile_size != config.step * patch:
        raise ConfigError(
            f"level-0 tiles of {config.tile_size} px at {config.mpp:g} µm/px are {patch} level-0 px on this "
            f"slide, so stride {config.step} would be {config.step * patch / config.tile_size:g} level-0 px; "
            f"give a stride that is a whole number of level-0 px (stride x {patch} / {config.tile_size} whole) "
            "or no stride")
    mean = (float(slide_mpp[0]) + float(slide_mpp[1])) / 2
    return dataclasses.replace(config, mpp=patch * mean / config.tile_size)


def level0_extent(level0_size: tuple[int, int], config: GridConfig,
                  slide_mpp: tuple[float, float]) -> tuple[float, float]:
    """(width, height) of the slide in a level-0 grid's target px: one target px is
    ``P / tile_size`` level-0 px along both axes, whatever the slide's µm/px (WSInfer's square
    ``P``-px patches, also on slides whose pixels are not square)."""
    k = config.tile_size / level0_tile_px(config.tile_size, config.mpp, slide_mpp)[0]
    return level0_size[0] * k, level0_size[1] * k


def block_tiles_for_level0(block_tiles: int, tile_size: int, mpp: float, slide_mpp: tuple[float, float],
                           max_window_px: int = MAX_LEVEL0_WINDOW_PX) -> int:
    """``block_tiles`` reduced so a block's level-0 window stays within ``max_window_px`` a side."""
    side = max(level0_tile_px(tile_size, mpp, slide_mpp))
    return max(1, min(block_tiles, max_window_px // side))
