"""The overlapped streaming loop: decoded blocks -> device -> store, each stage on its own thread.

Stages and who runs them::

    dask reader threads    decode blocks (the decoders release the GIL)      BlockFeed, <= prefetch blocks
    calling thread         copy tiles into pinned buffers, enqueue H2D,      BatchRunner.submit
                           preprocessing, model and D2H on a CUDA stream
    writer thread          wait for each block's D2H event, build its        BlockWriter, <= write_queue blocks
                           chunk, write Zarr, mark done / failed

Every hand-over is bounded (prefetch window, pinned input ring, output ring, writer queue), so
memory does not grow with the slide. On CPU ``submit`` computes before it returns; the writer
still overlaps Zarr writes with the next block's compute.

Errors: undecodable tiles of a block are left out of the batch and written as failed tiles with
the rest of their block (:class:`~wsi_cmaf.infer.dask_tasks.PartialBlock`), and so are tiles whose model
output was NaN/Inf (the runner returns their rows as NaN); a read failure of another
kind becomes a failed block (recorded by the writer, the slide goes on); an exception of the
model stops the loop after marking that block failed; a write error stops the loop at the next
hand-over. In every case the writer first drains what was already handed to it
(no lost writes: those blocks are done on resume) and the error is raised from
:func:`stream_blocks`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_cmaf.errors import OutputError
from wsi_cmaf.infer.buffers import PendingProbs
from wsi_cmaf.infer.dask_tasks import BlockFailure, PartialBlock
from wsi_cmaf.output.store_io import is_write_error, write_error
from wsi_cmaf.slide.grid import BlockTiles, TileGrid

logger = logging.getLogger(__name__)

_STOP = object()
#: a tile's failure reason when the model returned NaN or Inf for it
NONFINITE_REASON = "non-finite model output (NaN/Inf)"
#: what a write error leaves behind
RESUMABLE = ("blocks written before the error are kept and marked done, none after it; "
             "rerun the same command to resume")


def failed_tile_chunk(item: PartialBlock) -> np.ndarray:
    """bool (h, w) mask of the block's undecodable tiles, in the layout of its chunk."""
    rs, cs = item.block.rows, item.block.cols
    bad = np.zeros((rs.stop - rs.start, cs.stop - cs.start), bool)
    bad[np.asarray(item.failed_rows) - rs.start, np.asarray(item.failed_cols) - cs.start] = True
    return bad


def _failed_tiles(item: BlockTiles, nonfinite: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The block's failed-tile mask (undecodable tiles, and tiles whose model output was not
    finite, ``nonfinite`` over ``item.tiles``) and its message; (None, None) when none failed."""
    partial = item if isinstance(item, PartialBlock) else None
    if partial is None and not nonfinite.any():
        return None, None
    rs, cs = item.block.rows, item.block.cols
    bad = (failed_tile_chunk(partial) if partial is not None
           else np.zeros((rs.stop - rs.start, cs.stop - cs.start), bool))
    n = int(nonfinite.sum())
    if n:
        bad[np.asarray(item.rows)[nonfinite] - rs.start, np.asarray(item.cols)[nonfinite] - cs.start] = True
    reasons = ([partial.reason] if partial is not None else []) + ([f"{NONFINITE_REASON} ({n} tile(s))"] if n else [])
    return bad, "; ".join(reasons)


def block_chunk(item: BlockTiles, probs: np.ndarray, n_classes: int) -> np.ndarray:
    """Place tile probabilities into the block's chunk array (NaN where no tissue tile)."""
    rs, cs = item.block.rows, item.block.cols
    arr = np.full((n_classes, rs.stop - rs.start, cs.stop - cs.start), np.nan, dtype=np.float32)
    arr[:, np.asarray(item.rows) - rs.start, np.asarray(item.cols) - cs.start] = probs.T
    return arr


def block_embedding_chunk(item: BlockTiles, emb: np.ndarray) -> np.ndarray:
    """Place tile embeddings (N, D) into the block's float16 chunk (h, w, D) (NaN where no tile)."""
    rs, cs = item.block.rows, item.block.cols
    arr = np.full((rs.stop - rs.start, cs.stop - cs.start, emb.shape[1]), np.nan, dtype=np.float16)
    arr[np.asarray(item.rows) - rs.start, np.asarray(item.cols) - cs.start] = emb
    return arr


@dataclass
class _Write:
    item: BlockTiles
    pending: PendingProbs


@dataclass
class _Fail:
    index: tuple[int, int]
    error: str


class BlockWriter:
    """Writes finished blocks (and failure marks) to the store from one thread, in hand-over order.

    ``put`` blocks while ``maxsize`` blocks wait, which bounds the results held in memory, and
    raises as soon as a write has failed. After a failure the thread keeps taking (and
    discarding) hand-overs so the producer can never block on it.
    """

    def __init__(self, store: Any, grid: TileGrid, n_classes: int, maxsize: int,
                 on_written: Callable[[int], None] | None = None,
                 tasks: dict[str, int] | None = None) -> None:
        self.store, self.grid, self.n_classes = store, grid, n_classes
        # a multi-task model's other tasks: {task: classes}, their probabilities follow the primary's
        self.tasks = dict(tasks or {})
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self.error: BaseException | None = None
        self.written = 0
        self.nonfinite = 0  # tiles whose model output was NaN or Inf (written as failed tiles)
        self.wait_s = 0.0  # time spent waiting for device results (device busy, writer idle)
        self._on_written = on_written
        self._thread = threading.Thread(target=self._run, name="wsi-cmaf-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is _STOP:
                return
            if self.error is not None:
                if isinstance(job, _Write):
                    job.pending.discard()
                continue
            try:
                self._apply(job)
            except BaseException as exc:  # recorded and re-raised in the producer's thread
                self.error = exc
                logger.error("writer: %s failed: %s", getattr(job, "index", None) or job.item.block.index, exc)
                if isinstance(job, _Write):
                    job.pending.discard()

    def _apply(self, job: _Write | _Fail) -> None:
        if isinstance(job, _Fail):
            self.store.mark_failed(job.index, job.error)
            n = int(self.grid.tissue[self.grid.block_slices(job.index)].sum())
        else:
            t0 = time.perf_counter()
            probs = job.pending.result()
            self.wait_s += time.perf_counter() - t0
            # the runner turns every row whose model output was not finite into NaN
            nonfinite = ~np.isfinite(probs).all(axis=1) if len(probs) else np.zeros(0, bool)
            self.nonfinite += int(nonfinite.sum())
            # rows: [primary probabilities | each other task's (multi-task models) | embeddings]
            extra: dict[str, Any] = {}
            col = self.n_classes
            if self.tasks:
                extra["tasks"] = {}
                for task, k in self.tasks.items():
                    seg = probs[:, col:col + k] if probs.shape[1] >= col + k else np.zeros((len(probs), k), np.float32)
                    extra["tasks"][task] = block_chunk(job.item, seg, k)
                    col += k
            if probs.shape[1] > col:  # the tile embeddings (InferenceConfig.embeddings)
                extra["embeddings"] = block_embedding_chunk(job.item, probs[:, col:])
            probs = probs[:, : self.n_classes]
            chunk = block_chunk(job.item, probs, self.n_classes)
            bad, reason = _failed_tiles(job.item, nonfinite)
            if bad is not None:
                self.store.write_block(job.item.block.index, chunk, bad, reason, nonfinite=int(nonfinite.sum()),
                                       **extra)
            else:
                self.store.write_block(job.item.block.index, chunk, **extra)
            n = len(job.item.tiles) + (job.item.n_failed if isinstance(job.item, PartialBlock) else 0)
        self.written += 1
        if self._on_written is not None:
            self._on_written(n)

    def put(self, job: _Write | _Fail) -> None:
        """Hand a job over; raises :class:`OutputError` once a write has failed."""
        while True:
            self.raise_error()
            try:
                self.queue.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        """Raise the writer's error, if any, in the calling thread."""
        if self.error is not None:
            if is_write_error(self.error):  # a full or read-only disk: say so, and what is kept
                raise write_error(self.error, self.store.path, RESUMABLE) from self.error
            raise OutputError(f"{self.store.path}: writing a heatmap block failed: "
                              f"{type(self.error).__name__}: {self.error}") from self.error

    def close(self) -> None:
        """Let the writer finish what it was handed, then stop it (never raises)."""
        self.queue.put(_STOP)  # the thread always drains, so this cannot block for long
        self._thread.join()


def stream_blocks(
    items: Iterable[BlockTiles | BlockFailure],
    runner: Any,
    store: Any,
    grid: TileGrid,
    n_classes: int,
    *,
    write_queue: int = 4,
    on_written: Callable[[int], None] | None = None,
    tasks: dict[str, int] | None = None,
) -> int:
    """Run every block of ``items`` through ``runner`` into ``store``; return the number failed.

    ``runner`` needs ``submit(tiles) -> PendingProbs`` (:class:`~wsi_cmaf.infer.runner.BatchRunner`).
    ``tasks`` ({task: classes}): a multi-task model's tasks after the primary one, whose
    probabilities follow the primary task's in each result row and go to the store's task groups.
    """
    writer = BlockWriter(store, grid, n_classes, write_queue, on_written, tasks)
    n_failed = 0
    try:
        for item in items:
            if isinstance(item, BlockFailure):
                writer.put(_Fail(item.index, item.error))
                n_failed += 1
                continue
            if len(item.tiles) == 0:
                writer.put(_Write(item, PendingProbs(0, array=np.zeros((0, n_classes), np.float32))))
                continue
            try:
                pending = runner.submit(item.tiles)
            except Exception as exc:
                # the model failed on this block: record it, then stop (a model error is not local)
                if writer.error is None:
                    writer.put(_Fail(item.block.index, f"inference failed: {type(exc).__name__}: {exc}"))
                raise
            writer.put(_Write(item, pending))
    finally:
        writer.close()
    writer.raise_error()
    logger.debug("stream: %d blocks written (%d tiles with non-finite model output), writer waited %.2fs for "
                 "the device", writer.written, writer.nonfinite, writer.wait_s)
    return n_failed


class BlockFeed:
    """Blocks read by ``read(*args, block)`` on a dask client, at most ``prefetch`` in flight,
    yielded as they finish. Nothing is submitted before :meth:`start` or the first iteration.
    """

    def __init__(self, client: Any, read: Callable, args: tuple, blocks: list, prefetch: int) -> None:
        from distributed import as_completed

        # args are passed to submit directly (not bound in a partial) so dask resolves futures in them
        self._client, self._read, self._args = client, read, args
        self._pending: Iterator = iter(blocks)
        self._prefetch = prefetch
        self._futures: set = set()
        self._ac = as_completed([], loop=client.loop)

    def _submit(self, n: int) -> None:
        for _ in range(n):
            block = next(self._pending, None)
            if block is None:
                return
            fut = self._client.submit(self._read, *self._args, block, pure=False)
            self._futures.add(fut)
            self._ac.add(fut)

    def start(self) -> BlockFeed:
        """Submit the first ``prefetch`` reads (idempotent)."""
        if not self._futures:
            self._submit(self._prefetch)
        return self

    def __iter__(self) -> Iterator[BlockTiles | BlockFailure]:
        self.start()
        for fut in self._ac:
            item = fut.result()
            self._futures.discard(fut)
            fut.release()
            self._submit(1)
            yield item

    def cancel(self) -> None:
        """Cancel reads still in flight (after an error or an interrupt)."""
        for f in self._futures:
            f.cancel()
        self._ac.clear()
        self._futures.clear()
