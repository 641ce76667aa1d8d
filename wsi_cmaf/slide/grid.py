"""Tile grids at a target µm/px: where each tile and block lies on the slide.

A :class:`TileGrid` lays square tiles of ``tile_size`` px at ``mpp`` µm/px over the slide, with
``stride`` px between tile origins (``stride < tile_size`` gives overlap). Tile ``(row, col)``
covers target-grid pixels ``[row * stride, row * stride + tile_size)`` (same for columns),
where the target grid is the slide resampled to ``mpp`` with its origin at level-0 (0, 0).

**Partial edge tiles are padded, analysed and marked.** The grid covers the whole slide: after
the whole tiles, one more row (column) starts where the next stride falls when the strip the whole
tiles leave uncovered is not empty and at least ``min_inside_fraction`` (default 1/4) of that tile
lies inside the slide; ``inside_fraction[r, c]`` is the share of each tile's area inside the slide
(1 for whole tiles). Target pixels wholly beyond the slide edge are set to :data:`PAD_VALUE` (255,
white, what OpenSlide and tiffslide already return there), so the model sees glass; the one pixel
straddling the edge of a resampled grid keeps its blend. ``tissue_fraction`` is measured over the
inside area, so a tile half off the slide and full of tissue inside counts as tissue.
``min_inside_fraction=1`` restores whole tiles only.

Tiles are grouped in **blocks** of ``block_tiles x block_tiles`` tiles: one block is one unit
of work and one Zarr chunk of the heatmap. :func:`~wsi_cmaf.slide.reads.read_block` reads the
bounding box of the block's tissue tiles with ONE ``read_region`` call at the grid's level and
cuts the tiles in memory; blocks without tissue tiles are not in ``grid.blocks`` and are never read.

When the chosen level's µm/px equals the target (relative difference < 0.2 %), tiles are
plain crops of that level and pixel-identical to per-tile ``read_region`` calls. Otherwise
the level window is resized (Pillow, antialiased bilinear, with a sub-pixel source box) to
exactly the target grid; tiles then match per-tile reads (:func:`~wsi_cmaf.slide.reads.read_tile`)
to within interpolation round-off except near block edges (tested: mean absolute difference < 1
grey level). All pixel reads are in :mod:`wsi_cmaf.slide.reads`; this module holds geometry only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from wsi_cmaf.errors import ConfigError, RequestTooLargeError
from wsi_cmaf.slide._pixels import PAD_VALUE  # noqa: F401  (re-exported)
from wsi_cmaf.slide.level0 import level0_extent, level0_grid_config, wsinfer_level0_px
from wsi_cmaf.slide.tissue import inside_fractions, tissue_fractions  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch

    from wsi_cmaf.slide.reader import SlideReader
    from wsi_cmaf.slide.tissue import TissueMask

logger = logging.getLogger(__name__)

__all__ = ["GridConfig", "TileGrid", "Block", "BlockTiles", "PAD_VALUE", "level0_for_level_px",
           "tissue_fractions", "inside_fractions"]

_SAME_MPP_RTOL = 0.002  # level µm/px within 0.2 % of the target: read pixels as they are
#: Most tiles one grid may have (16.7 M; a 200,000 px slide at 0.25 µm/px has ~62,000 tiles of
#: 50 px at 4 µm/px). The grid's arrays grow with it, and it comes from user numbers.
MAX_GRID_TILES = 1 << 24


@dataclass(frozen=True)
class GridConfig:
    """Tile grid parameters (µm/px, tile size, stride, tissue threshold, block size)."""

    mpp: float = 4.0
    tile_size: int = 50
    stride: int | None = None
    tissue_threshold: float = 0.5
    block_tiles: int = 32
    mpp_tolerance: float = 0.05
    #: "pyramid": tiles from the level nearest ``mpp`` (fast); "level0": each tile is its region
    #: at full resolution, left at native size for the model's resize, placed on WSInfer's
    #: whole-pixel lattice (WSInfer's pixels; see :mod:`wsi_cmaf.slide.level0`).
    source: str = "pyramid"
    #: A partial last row/column enters the grid when at least this share of its tiles' height/width
    #: lies inside the slide. 1/4: tissue at the edge is analysed (a user expects that), while a
    #: sliver under a quarter tile (< 50 µm at 50 px x 4 µm/px), which would show the model over
    #: 75 % white padding, is not (whole tiles already carry up to ``1 - tissue_threshold`` glass).
    #: It also keeps float round-off from adding an empty row. The bottom-right corner tile, partial
    #: both ways, may be as little as 1/16 inside. 1.0 = whole tiles only.
    min_inside_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.source not in ("pyramid", "level0"):
            raise ConfigError(f"GridConfig.source must be 'pyramid' or 'level0', got {self.source!r}")
        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise ConfigError(f"GridConfig.mpp must be a positive number, got {self.mpp}")
        if self.tile_size < 1:
            raise ConfigError(f"GridConfig.tile_size must be >= 1, got {self.tile_size}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"GridConfig.stride must be >= 1, got {self.stride}")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ConfigError(f"GridConfig.tissue_threshold must be in [0, 1], got {self.tissue_threshold}")
        if self.block_tiles < 1:
            raise ConfigError(f"GridConfig.block_tiles must be >= 1, got {self.block_tiles}")
        if self.mpp_tolerance < 0:
            raise ConfigError(f"GridConfig.mpp_tolerance must be >= 0, got {self.mpp_tolerance}")
        if not 0.0 < self.min_inside_fraction <= 1.0:
            raise ConfigError(f"GridConfig.min_inside_fraction must be in (0, 1], got {self.min_inside_fraction}")

    @property
    def step(self) -> int:
        """Stride in target px (defaults to the tile size: no overlap)."""
        return self.tile_size if self.stride is None else self.stride


@dataclass(frozen=True)
class Block:
    """A block of tiles: ``index`` = (block row, block col); global tile index ranges."""

    index: tuple[int, int]
    rows: slice
    cols: slice


@dataclass
class BlockTiles:
    """Tissue tiles of one block: ``tiles`` (N, t, t, 3) uint8 with their global indices."""

    block: Block
    tiles: np.ndarray | torch.Tensor
    rows: np.ndarray
    cols: np.ndarray


def level0_for_level_px(px: int, downsample: float) -> int:
    """Smallest level-0 coordinate that backends map to level pixel ``px`` (int(loc / ds))."""
    loc = int(round(px * downsample))
    while int(loc / downsample) < px:
        loc += 1
    while loc > 0 and int((loc - 1) / downsample) >= px:
        loc -= 1
    return loc


def _target_extent(level0_size: tuple[int, int], slide_mpp: tuple[float, float],
                   config: GridConfig) -> tuple[float, float]:
    """(width, height) of the slide in target px."""
    if config.source == "level0":
        return level0_extent(level0_size, config, slide_mpp)
    return level0_size[0] * slide_mpp[0] / config.mpp, level0_size[1] * slide_mpp[1] / config.mpp


def mask_tile_fractions(mask: np.ndarray, mask_mpp: float, level0_size: tuple[int, int],
                        slide_mpp: tuple[float, float], config: GridConfig, shape: tuple[int, int]) -> np.ndarray:
    """Share (float32, ``shape``) of each grid tile's area inside the slide that a slide-level mask
    (isotropic pixels of ``mask_mpp`` µm from the slide's corner) covers."""
    f = tissue_fractions(np.asarray(mask, dtype=bool), (mask_mpp, mask_mpp), config.mpp,
                         config.tile_size, config.step, shape)
    # a partial edge tile's tissue is measured over its inside area (the padding is not slide)
    ex, ey = _target_extent(level0_size, slide_mpp, config)
    inside = np.outer(inside_fractions(shape[0], ey, config.tile_size, config.step),
                      inside_fractions(shape[1], ex, config.tile_size, config.step))
    return np.where(inside > 0, np.minimum(f / np.maximum(inside, 1e-12), 1.0), 0.0).astype(np.float32)


@dataclass
class TileGrid:
    """Tiles at ``config.mpp`` over one slide; build with :meth:`from_slide`.

    ``tissue_fraction[r, c]`` is the fraction of tile (r, c)'s area inside the slide covered by the
    tissue mask and ``tissue`` marks tiles with fraction >= ``tissue_threshold`` (and > 0);
    ``inside_fraction`` is each tile's share inside the slide (< 1: a padded partial edge tile).
    """

    config: GridConfig
    level: int
    level_downsample: float
    slide_mpp: tuple[float, float]
    level0_size: tuple[int, int]  # (width, height) of level 0
    tissue_fraction: np.ndarray
    #: fraction of each tile covered by marker ink (same normalisation as ``tissue_fraction``); None: not known
    ink_fraction: np.ndarray | None = None
    tissue: np.ndarray = field(init=False)
    #: tiles that would be tissue tiles if ink counted as tissue but are mostly ink: not analysed
    ink_tiles: np.ndarray = field(init=False)
    blocks: list[Block] = field(init=False)
    #: share of each tile's area inside the slide (float32, grid shape): < 1 for partial edge tiles
    inside_fraction: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.config.source == "level0":  # whoever built the grid, level-0 mode reads level 0
            self.level, self.level_downsample = 0, 1.0
            self.config = level0_grid_config(self.config, self.slide_mpp)  # WSInfer's lattice
        (n_rows, n_cols), (ex, ey) = self.tissue_fraction.shape, self.target_extent
        t, step = self.config.tile_size, self.config.step
        self.inside_fraction = np.outer(inside_fractions(n_rows, ey, t, step),
                                        inside_fractions(n_cols, ex, t, step)).astype(np.float32)
        thr = self.config.tissue_threshold
        self.tissue = (self.tissue_fraction >= thr) & (self.tissue_fraction > 0)
        if self.ink_fraction is None:
            self.ink_tiles = np.zeros_like(self.tissue)
        else:
            marked = self.tissue_fraction + self.ink_fraction
            self.ink_tiles = (marked >= thr) & (marked > 0) & (self.ink_fraction > self.tissue_fraction)
            self.tissue &= ~self.ink_tiles
        self.blocks = []
        for by in range(self.n_block_rows):
            for bx in range(self.n_block_cols):
                rows, cols = self.block_slices((by, bx))
                if self.tissue[rows, cols].any():
                    self.blocks.append(Block((by, bx), rows, cols))

    def exclude(self, tiles: np.ndarray) -> None:
        """Leave ``tiles`` (bool, grid shape) out of the analysis: no longer tissue tiles, blocks rebuilt."""
        tiles = np.asarray(tiles, bool)
        if tiles.shape != self.tissue.shape:
            raise ValueError(f"tiles to exclude have shape {tiles.shape}, the grid is {self.tissue.shape}")
        self.tissue = self.tissue & ~tiles
        self.blocks = [b for b in self.blocks if self.tissue[b.rows, b.cols].any()]

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_slide(cls, reader: SlideReader, config: GridConfig | None = None,
                   tissue_mask: TissueMask | None = None) -> TileGrid:
        """Grid over ``reader`` (a SlideReader); ``tissue_mask`` a TissueMask, or None = all tissue."""
        config = config or GridConfig()
        mx, my = reader.mpp
        w0, h0 = reader.level_dimensions[0]
        if config.source == "level0":
            config = level0_grid_config(config, (mx, my))
        shape = cls.grid_shape((w0, h0), (mx, my), config)
        if shape[0] * shape[1] > MAX_GRID_TILES:
            raise RequestTooLargeError(
                f"{reader.path}: a grid of {config.tile_size} px tiles (stride {config.step}) at "
                f"{config.mpp:g} µm/px over this {w0}x{h0} px slide would have {shape[0]}x{shape[1]} "
                f"tiles, over the limit of {MAX_GRID_TILES:,}; check the grid's mpp and tile size")
        level = reader.level_for_mpp(config.mpp, config.mpp_tolerance)
        ink = None
        if tissue_mask is None:
            fraction = np.ones(shape, dtype=np.float32)
        else:
            m = float(tissue_mask.mpp)
            fraction = mask_tile_fractions(tissue_mask.mask, m, (w0, h0), (mx, my), config, shape)
            if tissue_mask.ink is not None:
                ink = mask_tile_fractions(tissue_mask.ink, m, (w0, h0), (mx, my), config, shape)
        grid = cls(config, level, float(reader.level_downsamples[level]), (float(mx), float(my)),
                   (int(w0), int(h0)), fraction, ink)
        logger.info("grid %dx%d tiles at %.3g µm/px (level %d, %s), %d tissue tiles in %d blocks",
                    shape[0], shape[1], config.mpp, level, "crop" if grid.exact else "resize",
                    grid.n_tissue, len(grid.blocks))
        return grid

    @staticmethod
    def grid_shape(level0_size: tuple[int, int], slide_mpp: tuple[float, float], config: GridConfig) -> tuple[int, int]:
        """(n_rows, n_cols): the whole tiles, plus one partial row/column where the whole tiles leave
        a strip uncovered and at least ``config.min_inside_fraction`` of that tile is inside the slide."""
        if config.source == "level0":
            config = level0_grid_config(config, slide_mpp)
        t, step = config.tile_size, config.step
        extents = _target_extent(level0_size, slide_mpp, config)  # slide size in target px

        def count(extent: float) -> int:
            n = max(0, math.floor((extent - t) / step + 1e-9) + 1)
            uncovered = extent - ((n - 1) * step + t if n else 0)
            # one more tile always reaches the edge: it starts at n * step <= the uncovered strip
            if uncovered > 1e-6 and (extent - n * step) / t >= config.min_inside_fraction - 1e-9:
                n += 1
            return n
        return count(extents[1]), count(extents[0])

    @property
    def target_extent(self) -> tuple[float, float]:
        """(width, height) of the slide in target-grid px (at ``config.mpp``)."""
        return _target_extent(self.level0_size, self.slide_mpp, self.config)

    @property
    def partial(self) -> np.ndarray:
        """bool (grid shape): tiles that reach past the slide's right or bottom edge (padded)."""
        return self.inside_fraction < 1.0

    # -- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(n_rows, n_cols) of tiles."""
        rows, cols = self.tissue_fraction.shape
        return rows, cols

    @property
    def block_shape(self) -> tuple[int, int]:
        """Tiles per block (== Zarr chunk shape of the heatmap)."""
        return (self.config.block_tiles, self.config.block_tiles)

    def block_slices(self, index: tuple[int, int]) -> tuple[slice, slice]:
        """Tile-row and tile-column ranges of block ``index`` (edge blocks are smaller)."""
        k0, k1 = self.block_shape
        return (slice(index[0] * k0, min((index[0] + 1) * k0, self.shape[0])),
                slice(index[1] * k1, min((index[1] + 1) * k1, self.shape[1])))

    @property
    def n_block_rows(self) -> int:
        return -(-self.shape[0] // self.config.block_tiles)

    @property
    def n_block_cols(self) -> int:
        return -(-self.shape[1] // self.config.block_tiles)

    @property
    def n_tissue(self) -> int:
        """Number of tissue tiles."""
        return int(self.tissue.sum())

    @property
    def level_scale(self) -> tuple[float, float]:
        """Level px per target px along (x, y)."""
        return (self.config.mpp / (self.slide_mpp[0] * self.level_downsample),
                self.config.mpp / (self.slide_mpp[1] * self.level_downsample))

    @property
    def exact(self) -> bool:
        """True when the level's µm/px is the target's: tiles are plain crops, no resizing.
        A level-0 grid is exact only when its tiles are level-0 px as they are (``P == tile_size``
        on a slide with square pixels)."""
        if self.config.source == "level0":
            patch, stride = self.level0_pitch
            return (patch == self.config.tile_size and stride == self.config.step
                    and all(abs(s - 1.0) < 1e-9 for s in self.level_scale))
        return all(abs(s - 1.0) < _SAME_MPP_RTOL for s in self.level_scale)

    @property
    def level0_pitch(self) -> tuple[int, int]:
        """(tile, stride) in whole level-0 px of a level-0 grid (WSInfer's ``P`` and ``S``)."""
        if self.config.source != "level0":
            raise ConfigError("level0_pitch is defined for level-0 grids only (GridConfig.source='level0')")
        return wsinfer_level0_px(self.config.tile_size, self.config.mpp, self.slide_mpp, self.config.stride)

    def tile_location(self, row: int, col: int) -> tuple[int, int]:
        """Level-0 (x, y) px of the top-left of tile (row, col)."""
        step = self.config.step
        if self.config.source == "level0":  # WSInfer's lattice: k * S, one rounding per slide
            stride = self.level0_pitch[1]
            return (col * stride, row * stride)
        if self.exact:
            return (level0_for_level_px(col * step, self.level_downsample),
                    level0_for_level_px(row * step, self.level_downsample))
        return (int(round(col * step * self.config.mpp / self.slide_mpp[0])),
                int(round(row * step * self.config.mpp / self.slide_mpp[1])))

    def tissue_indices(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """Global (rows, cols) of the tissue tiles of ``block``, row-major."""
        r, c = np.nonzero(self.tissue[block.rows, block.cols])
        return r + block.rows.start, c + block.cols.start
