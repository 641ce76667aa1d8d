"""Multi-view models in the slide engine (issue 17, items 1-2): views per tile from block reads.

A multi-view model (:class:`~wsi_cmaf.models.multiview.MultiViewNet` with ``num_views > 1``)
declares its views in its config, ``model_kwargs.views = [{"mpp": 4, "size": 50}, {"mpp": 16,
"size": 50}]``: view 0 is the tile itself (the config's ``spacing_um_px`` and
``patch_size_pixels``), the others are context centred on it. For each block the engine reads
every view with :func:`~wsi_cmaf.slide.views.read_block_views` (one ``read_region`` per block and
view, never per tile) on the dask reader threads, and packs the block's views and their missing
flags into one uint8 row per tile (:func:`pack_views`). Everything downstream (the batch runner's
pinned buffers, padding, the CUDA stream, the writer) handles those rows like tiles; on the device
:class:`ViewsPreprocessor` unpacks them, preprocesses every view like a tile (stain, resize to
``input_size``, channel normalisation) and the model gets ``(views, missing)``.

Undecodable slide tiles. When a block's view read hits one, every view is read again cell by
cell (:func:`read_block_views_tolerant`): a tile whose own view touches a bad cell is left out and
marked failed, as in single-view reads; a tile whose *context* view touches one keeps its
prediction with that view marked missing, which the model masks as it masks context beyond the
slide edge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from wsi_cmaf.errors import ModelConfigError, UnreadableSlideError
from wsi_cmaf.infer.tasks import (
    BlockFailure,
    PartialBlock,
    SlideSpec,
    _drop_reader,
    _TolerantReader,
    footprints_touching,
    worker_reader,
)
from wsi_cmaf.slide.grid import Block, BlockTiles, TileGrid
from wsi_cmaf.slide.reader import SlideReader
from wsi_cmaf.slide.views import (
    BlockViews,
    ViewSpec,
    _is_tile_view,
    _view_grid,
    _view_origins,
    read_block_views,
    tile_centres_level0,
)

logger = logging.getLogger(__name__)


def model_views(module: nn.Module, config, name: str = "model") -> tuple[ViewSpec, ...] | None:
    """The views of a multi-view model, or None for a single-view one.

    Taken from the config's ``model_kwargs.views``, else from the module's own config (a
    :class:`~wsi_cmaf.models.multiview.MultiViewConfig`). Raises :class:`ModelConfigError` when a
    model with several views declares none, declares a different number, or when view 0 is not
    the tile (``spacing_um_px`` µm/px, ``patch_size_pixels`` px).
    """
    kwargs = dict(getattr(config, "model_kwargs", None) or {})
    own = getattr(module, "config", None)
    declared = kwargs.get("views") or getattr(own, "views", None)
    n_views = kwargs.get("num_views", getattr(own, "num_views", None))
    if not declared:
        if isinstance(n_views, int) and n_views > 1:
            raise ModelConfigError(
                f"model {name!r} takes {n_views} views but declares none: add model_kwargs.views, e.g. "
                f'[{{"mpp": {config.spacing_um_px:g}, "size": {config.patch_size_pixels}}}, '
                f'{{"mpp": {4 * config.spacing_um_px:g}, "size": {config.patch_size_pixels}}}] (view 0 = the tile)')
        return None
    try:
        views = tuple(ViewSpec(float(v["mpp"]), int(v["size"])) for v in declared)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelConfigError(f"model {name!r}: views must be a list of {{mpp, size}}, got {declared!r}") from exc
    if isinstance(n_views, int) and len(views) != n_views:
        raise ModelConfigError(f"model {name!r} takes {n_views} views but declares {len(views)}: {declared}")
    tile = views[0]
    if tile.size != config.patch_size_pixels or abs(tile.mpp - config.spacing_um_px) > 1e-9 * config.spacing_um_px:
        raise ModelConfigError(
            f"model {name!r}: view 0 must be the tile ({config.spacing_um_px:g} µm/px, {config.patch_size_pixels} px: "
            f"spacing_um_px and patch_size_pixels), got {tile.mpp:g} µm/px, {tile.size} px")
    return views


def sample_input(views: Sequence[ViewSpec] | None, input_size: int) -> tuple:
    """A one-sample model input: ``(x,)`` for a tile model, ``(views, missing)`` for a multi-view one."""
    x = torch.zeros(1, 3, input_size, input_size)
    if not views:
        return (x,)
    return [x] * len(views), torch.zeros(1, len(views), dtype=torch.bool)


def pack_views(item: BlockViews) -> np.ndarray:
    """(N, L) uint8 rows: every view's pixels (row-major, view after view), then V missing flags."""
    n = item.rows.size
    parts = [v.reshape(n, -1) for v in item.views] + [item.missing.astype(np.uint8)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


class ViewsPreprocessor(nn.Module):
    """Packed rows (:func:`pack_views`) -> (list of V float (B, 3, S, S), missing bool (B, V)).

    Every view goes through the same :class:`~wsi_cmaf.infer.runner.TilePreprocessor` as a tile.
    """

    def __init__(self, tile: nn.Module, sizes: Sequence[int]) -> None:
        super().__init__()
        self.tile = tile
        self.sizes = [int(s) for s in sizes]

    def forward(self, packed: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        b, start, views = packed.shape[0], 0, []
        for s in self.sizes:
            n = s * s * 3
            views.append(self.tile(packed[:, start:start + n].reshape(b, s, s, 3)))
            start += n
        return views, packed[:, start:start + len(self.sizes)].bool()


def read_block_views_task(spec: SlideSpec, grid: TileGrid, views: Sequence[ViewSpec],
                          block: Block) -> BlockTiles | BlockFailure:
    """Read one block's views (one read per view) as :class:`BlockTiles` whose ``tiles`` are the
    packed rows; any other error fails the block (:class:`BlockFailure`),
    which a rerun retries. Undecodable slide tiles only fail the tiles whose own view they touch
    (:func:`read_block_views_tolerant`)."""
    try:
        reader = worker_reader(spec)
        try:
            item = read_block_views(reader, grid, block, list(views))
        except UnreadableSlideError as exc:
            logger.info("block %s of %s (views): %s; reading it again cell by cell", block.index, spec.path, exc)
            item, bad, reason = read_block_views_tolerant(reader, grid, block, list(views))
            if bad.any():
                keep = ~bad
                packed = pack_views(item)
                return PartialBlock(block, packed[keep], item.rows[keep], item.cols[keep],
                                    item.rows[bad], item.cols[bad], reason)
        return BlockTiles(block, pack_views(item), item.rows, item.cols)
    except Exception as exc:  # codec/IO errors of any backend: isolate them to this block
        logger.warning("block %s of %s (views) failed: %s", block.index, spec.path, exc)
        _drop_reader(spec)
        return BlockFailure(block.index, f"{type(exc).__name__}: {exc}")


def read_block_views_tolerant(reader: SlideReader, grid: TileGrid, block: Block, views: list[ViewSpec],
                              fill: int = 255) -> tuple[BlockViews, np.ndarray, str]:
    """:func:`read_block_views` that survives undecodable slide tiles: ``(views, failed, reason)``.

    Each view is read through a reader that re-reads a failing window cell by cell. ``failed``
    (bool per tile) marks tiles whose own view (the grid's spacing and size) touches a bad cell;
    a context view that touches one is marked missing and filled with ``fill`` instead.
    """
    rows, cols = grid.tissue_indices(block)
    centres = tile_centres_level0(grid, rows, cols)
    out: list[np.ndarray] = []
    missing = np.zeros((rows.size, len(views)), bool)
    failed = np.zeros(rows.size, bool)
    reasons: list[str] = []
    for v, spec in enumerate(views):
        vgrid = _view_grid(reader, grid, spec)
        proxy = _TolerantReader(reader, vgrid.level)
        part = read_block_views(proxy, grid, block, [spec], fill=fill, rows=rows, cols=cols)  # type: ignore[arg-type]
        pixels, missing[:, v] = part.views[0], part.missing[:, 0]
        if proxy.failed:
            reasons.append(proxy.failed[0][4])
            origin, _ = _view_origins(centres, vgrid, spec.size)
            touched = footprints_touching(vgrid, origin[:, 0], origin[:, 1], spec.size,
                                          [c[:4] for c in proxy.failed]) & ~part.missing[:, 0]
            if _is_tile_view(grid, spec):
                failed |= touched
            else:
                missing[touched, v] = True
                pixels[touched] = fill
                logger.warning("block %s of %s: view %d (%g µm/px) of %d tile(s) undecodable; those "
                               "tiles are predicted without it", block.index, reader.path, v, spec.mpp,
                               int(touched.sum()))
        out.append(pixels)
    if failed.any():
        logger.warning("block %s of %s: %d of %d tissue tile(s) undecodable (%s)", block.index, reader.path,
                       int(failed.sum()), failed.size, reasons[0])
    return BlockViews(block, rows, cols, out, missing), failed, reasons[0] if reasons else ""
