"""Multi-magnification views per tile, cut from one read per block and view.

For each tile of a :class:`~wsi_cmaf.slide.grid.TileGrid` a *view* is a square of ``size`` px at
``mpp`` µm/px centred on the tile: e.g. the tile itself (50 px at 4 µm/px) plus 50 px at 16 µm/px
of context around it. For one block of tiles, each view spacing costs ONE ``read_region``: the
bounding box of the block's views at the pyramid level nearest the view spacing, resampled once
to the view spacing (or cropped as is when the level already has it), then every tile's view is
cut from that array in memory. Tiles are never read one by one.

Geometry. Tile (r, c) covers target px ``[c·step, c·step + t)`` of the grid, so its centre in
level-0 px is ``(c·step + t/2)·k_g`` with ``k_g`` the level-0 px per grid px (the level's
downsample when the grid crops a level, ``mpp/slide_mpp`` when it resamples). A view's pixels lie
on a grid anchored at level-0 (0, 0) with ``k_v`` level-0 px per view px; its top-left is
``centre/k_v − size/2`` rounded to the nearest view px. So a view's centre coincides with the
tile's centre exactly when that number is whole (e.g. the tile's own spacing and size), and
otherwise lies within half a view pixel of it (≤ 8 µm for a 16 µm/px context view): the price of
resampling a block once instead of every tile on its own.

Missing views. A view whose pixels would leave the slide (level-0 ``[0, W) × [0, H)``) is marked
in ``missing`` (n_tiles, n_views) and filled with ``fill`` (white by default), so a model can mask
it (:class:`wsi_cmaf.models.multiview.MultiViewNet`). The exception is the view with the grid's
own spacing and tile size: it *is* the tile, so it is present whenever the tile is, also for a
partial edge tile (white beyond the slide, as the tile itself). A view spacing for which no tile of the
block has an inside view costs no read. Views always come from the pyramid, also for grids with
``source == "level0"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reads import read_target_window

if TYPE_CHECKING:
    from wsi_cmaf.slide.grid import Block
    from wsi_cmaf.slide.reader import SlideReader

logger = logging.getLogger(__name__)

__all__ = ["ViewSpec", "BlockViews", "as_view_specs", "views_attrs", "read_block_views", "iter_block_views",
           "tile_centres_level0"]

_SAME_MPP_RTOL = 0.002  # as grid.py: a level within 0.2 % of the view spacing is cropped, not resampled


@dataclass(frozen=True)
class ViewSpec:
    """One view: ``size`` px at ``mpp`` µm/px, centred on each tile."""

    mpp: float
    size: int

    def __post_init__(self) -> None:
        if not (isinstance(self.mpp, (int, float)) and self.mpp > 0 and math.isfinite(self.mpp)):
            raise ConfigError(f"a view's mpp must be a positive number of µm/px, got {self.mpp!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"a view's size must be a positive int of px, got {self.size!r}")


def as_view_specs(views: Sequence[ViewSpec | dict]) -> list[ViewSpec]:
    """Views given as :class:`ViewSpec` or ``{"mpp", "size"}`` dicts, as ViewSpecs (float mpp, int size)."""
    return [ViewSpec(float(v.mpp), int(v.size)) if isinstance(v, ViewSpec)
            else ViewSpec(float(v["mpp"]), int(v["size"])) for v in views]


def views_attrs(views: Sequence[ViewSpec]) -> list[dict[str, float | int]]:
    """Views in the stores' and model configs' form: ``[{"mpp": float, "size": int}]``, view 0 = the tile."""
    return [{"mpp": float(v.mpp), "size": int(v.size)} for v in views]


@dataclass
class BlockViews:
    """Views of the tiles (rows, cols) of one block.

    ``views[v]`` is (N, size_v, size_v, 3) uint8; ``missing[i, v]`` is True when view v of tile i
    leaves the slide (its pixels are then ``fill``).
    """

    block: Block | None
    rows: np.ndarray
    cols: np.ndarray
    views: list[np.ndarray]
    missing: np.ndarray

    def stacked(self) -> np.ndarray:
        """(N, V, s, s, 3) when every view has the same size (the model's batched input)."""
        sizes = {v.shape[1:3] for v in self.views}
        if len(sizes) != 1:
            raise ConfigError(f"views have different sizes {sorted(sizes)}; use .views per view instead")
        return np.stack(self.views, axis=1)


def _grid_k(grid: TileGrid) -> tuple[float, float]:
    """Level-0 px per grid (target) px along (x, y)."""
    if grid.exact:
        return (grid.level_downsample, grid.level_downsample)
    return (grid.config.mpp / grid.slide_mpp[0], grid.config.mpp / grid.slide_mpp[1])


def tile_centres_level0(grid: TileGrid, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(N, 2) float level-0 (x, y) of the centres of tiles (rows, cols)."""
    t, step = grid.config.tile_size, grid.config.step
    kx, ky = _grid_k(grid)
    return np.stack([(np.asarray(cols) * step + t / 2.0) * kx, (np.asarray(rows) * step + t / 2.0) * ky], axis=1)


def _view_grid(reader: SlideReader, grid: TileGrid, spec: ViewSpec) -> TileGrid:
    """A tile-less TileGrid at the view spacing: it knows the level and how to read a window."""
    level = reader.level_for_mpp(spec.mpp, grid.config.mpp_tolerance)
    config = GridConfig(mpp=spec.mpp, tile_size=spec.size, block_tiles=1,
                        mpp_tolerance=grid.config.mpp_tolerance)
    return TileGrid(config, level, float(reader.level_downsamples[level]), grid.slide_mpp,
                    grid.level0_size, np.zeros((0, 0), np.float32))


def _view_origins(centres: np.ndarray, vgrid: TileGrid, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer view-px top-left (N, 2) of each view, and whether it lies inside the slide (N,)."""
    kx, ky = _grid_k(vgrid)
    origin = np.floor(centres / np.array([kx, ky]) - size / 2.0 + 0.5).astype(np.int64)
    w0, h0 = vgrid.level0_size
    eps = 1e-9 * max(w0, h0)
    inside = ((origin[:, 0] >= 0) & (origin[:, 1] >= 0)
              & ((origin[:, 0] + size) * kx <= w0 + eps) & ((origin[:, 1] + size) * ky <= h0 + eps))
    return origin, inside


def _is_tile_view(grid: TileGrid, spec: ViewSpec) -> bool:
    """Whether ``spec`` is the grid's own tile (same spacing and size)."""
    return spec.size == grid.config.tile_size and abs(spec.mpp - grid.config.mpp) <= 1e-9 * grid.config.mpp


def read_block_views(reader: SlideReader, grid: TileGrid, block: Block | None, specs: Sequence[ViewSpec],
                     fill: int = 255, rows: np.ndarray | None = None,
                     cols: np.ndarray | None = None) -> BlockViews:
    """Views ``specs`` of the tissue tiles of ``block`` (or of the given ``rows``/``cols``).

    One ``read_region`` per view spacing with at least one inside view, whatever the number of
    tiles. Raises ConfigError for an empty ``specs`` or a ``fill`` outside 0..255.
    """
    if not specs:
        raise ConfigError("read_block_views needs at least one ViewSpec")
    if not 0 <= int(fill) <= 255:
        raise ConfigError(f"fill must be a grey level in 0..255, got {fill!r}")
    if rows is None or cols is None:
        if block is None:
            raise ConfigError("read_block_views needs a block or explicit rows and cols")
        rows, cols = grid.tissue_indices(block)
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    centres = tile_centres_level0(grid, rows, cols)
    n = rows.size
    views: list[np.ndarray] = []
    missing = np.ones((n, len(specs)), dtype=bool)
    for v, spec in enumerate(specs):
        s = spec.size
        out = np.full((n, s, s, 3), fill, dtype=np.uint8)
        if n:
            vgrid = _view_grid(reader, grid, spec)
            origin, inside = _view_origins(centres, vgrid, s)
            if _is_tile_view(grid, spec):
                # the tile itself: present whenever the tile is (the grid may pad partial edge
                # tiles; beyond the slide the read returns white, as the grid's own tiles have)
                inside[:] = True
            missing[:, v] = ~inside
            if inside.any():
                ox, oy = origin[inside, 0], origin[inside, 1]
                x0, y0 = int(ox.min()), int(oy.min())
                width, height = int(ox.max()) - x0 + s, int(oy.max()) - y0 + s
                window = read_target_window(reader, vgrid, y0, x0, height, width)[..., :3]
                # every inside view cut by one gather: (n_in, s, 1) row and (n_in, 1, s) column indices
                iy = (oy - y0)[:, None, None] + np.arange(s)[None, :, None]
                ix = (ox - x0)[:, None, None] + np.arange(s)[None, None, :]
                out[inside] = window[iy, ix]
        views.append(out)
    return BlockViews(block, rows, cols, views, missing)


def iter_block_views(reader: SlideReader, grid: TileGrid, specs: Sequence[ViewSpec],
                     fill: int = 255) -> Iterator[BlockViews]:
    """:func:`read_block_views` for every block of ``grid`` that has tissue tiles, in grid order."""
    for block in grid.blocks:
        yield read_block_views(reader, grid, block, specs, fill)
