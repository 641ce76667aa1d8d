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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.infer.tasks import BlockFailure, SlideSpec, _drop_reader, worker_reader
from wsi_cmaf.slide.grid import Block, BlockTiles, TileGrid
from wsi_cmaf.slide.views import BlockViews, ViewSpec, read_block_views

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


def views_attrs(views: Sequence[ViewSpec]) -> list[dict[str, float | int]]:
    """The store's ``views`` attribute: µm/px and size of each view, view 0 = the tile."""
    return [{"mpp": float(v.mpp), "size": int(v.size)} for v in views]


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
    packed rows; any error, undecodable pixels included, fails the block (:class:`BlockFailure`),
    which a rerun retries."""
    try:
        reader = worker_reader(spec)
        item = read_block_views(reader, grid, block, list(views))
        return BlockTiles(block, pack_views(item), item.rows, item.cols)
    except Exception as exc:  # codec/IO errors of any backend: isolate them to this block
        logger.warning("block %s of %s (views) failed: %s", block.index, spec.path, exc)
        _drop_reader(spec)
        return BlockFailure(block.index, f"{type(exc).__name__}: {exc}")
