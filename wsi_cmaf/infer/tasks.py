"""Small pure tasks that dask runs on workers: open a slide (once per worker thread), read a block.

Tasks receive the slide as a picklable :class:`SlideSpec`, never an open handle, so they run
the same on an in-process cluster and on remote worker processes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from wsi_cmaf.slide.grid import Block, BlockTiles, TileGrid, read_block
from wsi_cmaf.slide.reader import SlideReader, open_slide

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
    """Read one block's tissue tiles; a decoding error becomes a :class:`BlockFailure`."""
    try:
        return read_block(worker_reader(spec), grid, block)
    except Exception as exc:  # codec/IO errors of any backend: isolate them to this block
        logger.warning("block %s of %s failed: %s", block.index, spec.path, exc)
        _drop_reader(spec)
        return BlockFailure(block.index, f"{type(exc).__name__}: {exc}")


def _drop_reader(spec: SlideSpec) -> None:
    """Forget this thread's reader after a failed read: an OpenSlide handle stays in error state."""
    cache = getattr(_local, "readers", {})
    reader = cache.pop(spec, None)
    if reader is not None:
        try:
            reader.close()
        except Exception:  # closing a handle in error state may fail too; it is discarded anyway
            logger.debug("closing a failed reader raised", exc_info=True)

