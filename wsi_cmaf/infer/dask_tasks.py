"""Small pure tasks that dask runs on workers: open a slide (once per worker thread), read a block.

Tasks receive the slide as a picklable :class:`SlideSpec`, never an open handle, so they run
the same on an in-process cluster and on remote worker processes.

A block whose read fails to decode is read again window cell by window cell (cells on the
slide's storage tiles, :func:`~wsi_cmaf.slide.faults.read_window_tolerant`): only the grid tiles
whose pixels touch an undecodable cell are dropped (:class:`PartialBlock`), the rest of the block
is computed. Only an error that is not a decoding error fails the whole block (:class:`BlockFailure`).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

from wsi_cmaf.errors import UnreadableSlideError
from wsi_cmaf.slide.faults import DEFAULT_TILE, read_window_tolerant
from wsi_cmaf.slide.grid import Block, BlockTiles, TileGrid, level0_for_level_px
from wsi_cmaf.slide.reader import SlideReader, open_slide
from wsi_cmaf.slide.reads import read_block

logger = logging.getLogger(__name__)

_local = threading.local()


@dataclass(frozen=True)
class SlideSpec:
    """Everything a worker needs to reopen the slide the driver opened."""

    path: str
    backend: str
    mpp: tuple[float, float] | None


@dataclass(frozen=True)
class BlockFailure:
    """A block whose read failed; the rest of the slide goes on."""

    index: tuple[int, int]
    error: str


@dataclass
class PartialBlock(BlockTiles):
    """A block read after a decoding failure: ``tiles`` holds the decodable tissue tiles only;
    ``failed_rows``/``failed_cols`` (global tile indices) are the tiles that could not be decoded."""

    failed_rows: np.ndarray
    failed_cols: np.ndarray
    reason: str

    @property
    def n_failed(self) -> int:
        """Number of undecodable tissue tiles."""
        return int(self.failed_rows.size)


def worker_reader(spec: SlideSpec) -> SlideReader:
    """The calling thread's reader for ``spec``, opened on first use.

    One reader per thread: OpenSlide handles are thread-safe but tiffslide/tifffile keep
    per-handle file positions and caches, so sharing one across threads is not safe.
    """
    cache: dict[SlideSpec, SlideReader] | None = getattr(_local, "readers", None)
    if cache is None:
        cache = _local.readers = {}
    reader = cache.get(spec)
    if reader is None:
        if len(cache) >= 4:  # a worker serving a batch moves on to other slides; close old handles
            for old in list(cache.values()):
                old.close()
            cache.clear()
        reader = cache[spec] = open_slide(spec.path, backend=spec.backend, mpp=spec.mpp)
    return reader


def read_block_task(spec: SlideSpec, grid: TileGrid, block: Block) -> BlockTiles | BlockFailure:
    """Read one block's tissue tiles; undecodable tiles are dropped (:class:`PartialBlock`), any
    other error becomes a :class:`BlockFailure`."""
    try:
        reader = worker_reader(spec)
        try:
            return read_block(reader, grid, block)
        except UnreadableSlideError as exc:
            logger.info("block %s of %s: %s; reading it again cell by cell", block.index, spec.path, exc)
            return read_block_tolerant(reader, grid, block)
    except Exception as exc:  # codec/IO errors of any backend: isolate them to this block
        logger.warning("block %s of %s failed: %s", block.index, spec.path, exc)
        _drop_reader(spec)
        return BlockFailure(block.index, f"{type(exc).__name__}: {exc}")


class _TolerantReader:
    """Stands in for a SlideReader in :func:`read_block`: a failing ``read_region`` is read again
    cell by cell, undecodable cells come back white and are recorded (level px + reason)."""

    def __init__(self, reader: SlideReader, level: int) -> None:
        self._reader = reader
        self.call_overhead_px = reader.call_overhead_px
        self.failed: list[tuple[int, int, int, int, str]] = []
        props = reader.properties
        w = props.get(f"{reader.backend}.level[{level}].tile-width")
        h = props.get(f"{reader.backend}.level[{level}].tile-height")
        # cells on the storage tiles: one bad tile costs one cell; a guess when the backend says nothing
        self._cell = (int(float(w)), int(float(h))) if w and h else (DEFAULT_TILE, DEFAULT_TILE)

    def __getattr__(self, name: str):
        # geometry and metadata (level_for_mpp, level_downsamples, ...) come from the real reader
        if name == "_reader":  # not set yet (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self._reader, name)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self._reader.level_downsamples[level]

        def read(x: int, y: int, w: int, h: int) -> np.ndarray:
            # the level-0 location read_block would use for this level pixel
            return self._reader.read_region((level0_for_level_px(x, ds), level0_for_level_px(y, ds)), level, (w, h))

        box = (int(location[0] / ds), int(location[1] / ds), int(size[0]), int(size[1]))
        # recover: the backends reset their own handles after a failed read (OpenSlide reopens)
        return read_window_tolerant(read, box, self._cell, (UnreadableSlideError,), lambda: None,
                                    lambda cell, why: self.failed.append((*cell, why)))


def read_block_tolerant(reader: SlideReader, grid: TileGrid, block: Block) -> BlockTiles:
    """:func:`read_block` that survives undecodable slide tiles: the grid tiles whose pixels (with
    the resampling filter's reach) touch one are left out and listed in a :class:`PartialBlock`."""
    proxy = _TolerantReader(reader, grid.level)
    item = read_block(proxy, grid, block)  # type: ignore[arg-type]
    if not proxy.failed:  # the failure did not repeat
        return item
    bad = tiles_touching(grid, item.rows, item.cols, [c[:4] for c in proxy.failed])
    reason = proxy.failed[0][4]
    logger.warning("block %s of %s: %d of %d tissue tile(s) undecodable (%s)", block.index, reader.path,
                   int(bad.sum()), bad.size, reason)
    keep = ~bad
    return PartialBlock(block, item.tiles[keep], item.rows[keep], item.cols[keep],
                        item.rows[bad], item.cols[bad], reason)


def tiles_touching(grid: TileGrid, rows: np.ndarray, cols: np.ndarray,
                   cells: list[tuple[int, int, int, int]]) -> np.ndarray:
    """bool per tile (rows[i], cols[i]): whether its level-px footprint meets one of ``cells``
    ((x, y, w, h) level px). Resized grids widen footprints by the margin the block read adds for
    the resampling filter, so a tile that saw any painted pixel is included."""
    step = grid.config.step
    return footprints_touching(grid, cols * step, rows * step, grid.config.tile_size, cells)


def footprints_touching(grid: TileGrid, x: np.ndarray, y: np.ndarray, size: int,
                        cells: list[tuple[int, int, int, int]]) -> np.ndarray:
    """bool per square of ``size`` target px at target px (x[i], y[i]) of ``grid``: whether its
    level-px footprint (widened by the resampling filter's reach on resized grids) meets a cell."""
    if grid.exact:
        sx = sy = 1.0
        mx = my = 0
    else:
        sx, sy = grid.level_scale
        mx, my = math.ceil(sx) + 1, math.ceil(sy) + 1
    x0, x1 = x * sx - mx, (x + size) * sx + mx
    y0, y1 = y * sy - my, (y + size) * sy + my
    bad = np.zeros(np.shape(x), bool)
    for cx, cy, cw, ch in cells:
        bad |= (x0 < cx + cw) & (cx < x1) & (y0 < cy + ch) & (cy < y1)
    return bad


def _drop_reader(spec: SlideSpec) -> None:
    """Forget this thread's reader after a failed read: an OpenSlide handle stays in error state."""
    cache = getattr(_local, "readers", {})
    reader = cache.pop(spec, None)
    if reader is not None:
        try:
            reader.close()
        except Exception:  # closing a handle in error state may fail too; it is discarded anyway
            logger.debug("closing a failed reader raised", exc_info=True)

