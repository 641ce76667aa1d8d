"""Multi-view models in the slide engine: views per tile from block reads.

A multi-view model (:class:`~wsi_cmaf.models.multiview.MultiViewNet` with ``num_views > 1``)
declares its views in its config, ``model_kwargs.views = [{"mpp": 4, "size": 50}, {"mpp": 16,
"size": 50}]``: view 0 is the tile itself (the config's ``spacing_um_px`` and
``patch_size_pixels``), the others are context centred on it. For each block the engine reads
every view with :func:`~wsi_cmaf.slide.views.read_block_views` (one ``read_region`` per block and
view, never per tile) on the dask reader threads, and packs the block's views and their missing
flags into one uint8 row per tile (:func:`~wsi_cmaf.preprocess.pack_views`). Everything downstream
(the batch runner's pinned buffers, padding, the CUDA stream, the writer) handles those rows like
tiles; on the device :class:`~wsi_cmaf.preprocess.ViewsPreprocessor` unpacks them, preprocesses
every view like a tile (stain, resize to ``input_size``, channel normalisation) and the model gets
``(views, missing)``.

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

from wsi_cmaf.errors import UnreadableSlideError
from wsi_cmaf.infer.dask_tasks import (
    BlockFailure,
    PartialBlock,
    SlideSpec,
    _drop_reader,
    _TolerantReader,
    footprints_touching,
    worker_reader,
)
from wsi_cmaf.preprocess import pack_views
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
