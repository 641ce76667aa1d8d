"""The overlapped streaming loop: reused buffers, bounded hand-overs, errors from every stage."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.models import DarknessClassifier
from wsi_cmaf.errors import OutputError
from wsi_cmaf.infer.buffers import HostBufferRing, PendingProbs
from wsi_cmaf.infer.dask_tasks import BlockFailure
from wsi_cmaf.infer.runner import BatchRunner
from wsi_cmaf.infer.stream import stream_blocks
from wsi_cmaf.preprocess import TilePreprocessor
from wsi_cmaf.slide.grid import BlockTiles, GridConfig, TileGrid

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_ring_reuses_its_buffers_and_waits_for_release():
    ring = HostBufferRing(3, pin=False)
    seen = set()
    for _ in range(30):  # many batches, three buffers
        slot, buf = ring.acquire((4, 5), torch.uint8)
        seen.add(buf.data_ptr())
        ring.release(slot)
    assert ring.allocations == 3 and len(seen) == 3
    held = [ring.acquire((4, 5), torch.uint8)[0] for _ in range(3)]
    assert not ring.wait_next(timeout=0.05)  # every slot in use: the producer would wait
    threading.Timer(0.1, ring.release, args=(held[0],)).start()
    t0 = time.perf_counter()
    slot, _ = ring.acquire((4, 5), torch.uint8)  # blocks until the release above
    assert slot == held[0] and time.perf_counter() - t0 >= 0.05
    for i in (slot, *held[1:]):
        ring.release(i)
    _, big = ring.acquire((8, 5), torch.uint8)  # a larger request grows that slot once
    assert big.shape == (8, 5) and ring.allocations == 4


def test_cpu_submit_equals_call_and_is_ready():
    runner = BatchRunner(DarknessClassifier(), TilePreprocessor(32, MEAN, STD), torch.device("cpu"), 64)
    tiles = np.random.default_rng(0).integers(0, 256, (100, 50, 50, 3), dtype=np.uint8)
    pending = runner.submit(tiles)
    assert pending.array is not None  # CPU: computed before submit returns
    np.testing.assert_array_equal(pending.result(), runner(tiles))


# --------------------------------------------------------------------------- loop with fakes
def _grid(n_blocks: int) -> TileGrid:
    tissue = np.ones((4, 4 * n_blocks), np.float32)
    return TileGrid(GridConfig(mpp=4.0, tile_size=2, block_tiles=4), 0, 1.0, (4.0, 4.0),
                    (8 * n_blocks, 8), tissue)


def _items(grid: TileGrid, fail: set[int] = frozenset()):
    for b in grid.blocks:
        if b.index[1] in fail:
            yield BlockFailure(b.index, "decode error")
            continue
        rows, cols = grid.tissue_indices(b)
        tiles = np.full((rows.size, 2, 2, 3), b.index[1], np.uint8)
        yield BlockTiles(b, tiles, rows, cols)


class FakeStore:
    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.path = Path("fake.zarr")
        self.written: dict[tuple, np.ndarray] = {}
        self.failed: dict[tuple, str] = {}
        self.delay, self.fail_on = delay, fail_on

    def write_block(self, index, chunk) -> None:
        time.sleep(self.delay)
        if self.fail_on is not None and index[1] == self.fail_on:
            raise OSError("disk full")
        self.written[tuple(index)] = chunk

    def mark_failed(self, index, error) -> None:
        self.failed[tuple(index)] = error


class FakeRunner:
    """Returns the block's value as probability; counts results not yet taken by the writer."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.fail_on = fail_on
        self.outstanding = 0
        self.max_outstanding = 0
        self._lock = threading.Lock()

    def submit(self, tiles: np.ndarray) -> PendingProbs:
        value = int(tiles[0, 0, 0, 0])
        if value == self.fail_on:
            raise RuntimeError("model exploded")
        with self._lock:
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
        runner = self

        class Pending(PendingProbs):
            def result(self) -> np.ndarray:
                with runner._lock:
                    runner.outstanding -= 1
                return np.tile([[1.0 - value / 100, value / 100]], (len(tiles), 1)).astype(np.float32)

        return Pending(len(tiles))


def test_loop_writes_every_block_and_records_read_failures():
    grid = _grid(6)
    store, runner = FakeStore(), FakeRunner()
    done = []
    n_failed = stream_blocks(_items(grid, fail={2}), runner, store, grid, 2, write_queue=2, on_written=done.append)
    assert n_failed == 1 and set(store.failed) == {(0, 2)}
    assert set(store.written) == {(0, i) for i in range(6) if i != 2}
    np.testing.assert_allclose(store.written[(0, 5)][1], 0.05)
    assert sum(done) == grid.n_tissue  # progress counts failed blocks' tiles too


def test_results_in_flight_are_bounded_by_the_writer_queue():
    grid = _grid(12)
    store, runner = FakeStore(delay=0.03), FakeRunner()  # slow writer, fast model
    stream_blocks(_items(grid), runner, store, grid, 2, write_queue=2)
    assert len(store.written) == 12
    # queue (2) + the one being written + the one being handed over
    assert runner.max_outstanding <= 4


def test_write_error_stops_the_loop_without_hanging():
    grid = _grid(10)
    store = FakeStore(fail_on=3)
    t0 = time.perf_counter()
    with pytest.raises(OutputError, match="disk full"):
        stream_blocks(_items(grid), FakeRunner(), store, grid, 2, write_queue=1)
    assert time.perf_counter() - t0 < 10
    assert {(0, 0), (0, 1), (0, 2)} <= set(store.written)
    assert (0, 3) not in store.written and len(store.written) < 10


def test_model_error_marks_the_block_failed_and_keeps_earlier_writes():
    grid = _grid(6)
    store = FakeStore(delay=0.02)
    with pytest.raises(RuntimeError, match="model exploded"):
        stream_blocks(_items(grid), FakeRunner(fail_on=3), store, grid, 2, write_queue=4)
    # everything handed to the writer before the error was written (no lost writes) ...
    assert set(store.written) == {(0, 0), (0, 1), (0, 2)}
    # ... and the block the model failed on is recorded as failed
    assert "model exploded" in store.failed[(0, 3)]


def test_interrupt_of_the_source_drains_the_writer():
    grid = _grid(6)
    store = FakeStore(delay=0.02)

    def source():
        for i, item in enumerate(_items(grid)):
            if i == 4:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        stream_blocks(source(), FakeRunner(), store, grid, 2, write_queue=4)
    assert set(store.written) == {(0, i) for i in range(4)}

