"""Faults of the CUDA path that show on the CPU: a ring slot kept after an error (a hang), models
prepared twice, two locks for one GPU, emulated bf16, spinning events, one compiled shape and
CUDA graphs from a second thread. The CUDA path is run here with the device calls faked; the
same paths on a real GPU are in test_cuda_runner.py."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch

import wsi_cmaf.models.optimize as optimize
from tests.helpers.models import DarknessClassifier
from wsi_cmaf.device import autocast_dtype
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.infer.buffers import HostBufferRing
from wsi_cmaf.infer.prepared import device_lock, prepared_model
from wsi_cmaf.infer.runner import BatchRunner
from wsi_cmaf.preprocess import TilePreprocessor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _FakeEvent:
    """Stands in for torch.cuda.Event on the CPU: always complete; remembers how it was made."""

    made: list[dict] = []

    def __init__(self, **kwargs: object) -> None:
        _FakeEvent.made.append(kwargs)

    def record(self, stream: object = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _FakeStream:
    def synchronize(self) -> None:
        pass


@pytest.fixture
def fake_cuda_runner(monkeypatch):
    """A CPU BatchRunner driven down its CUDA enqueue path (2 input slots, unpinned rings)."""
    _FakeEvent.made = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    runner = BatchRunner(DarknessClassifier(), TilePreprocessor(32, MEAN, STD), torch.device("cpu"), 8,
                         precision="off")
    runner._cuda = True
    runner._lock = threading.Lock()  # its own: a hang in one test must not hold the CPU's lock for the rest
    runner.stream = _FakeStream()
    runner.inputs = HostBufferRing(2, pin=False)
    runner.outputs = HostBufferRing(4, pin=False)
    return runner


def _tiles(n: int = 20) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, 50, 50, 3), dtype=np.uint8)


def test_error_between_acquire_and_release_frees_the_slot(fake_cuda_runner, monkeypatch):
    """An OOM while the device batch is allocated (between the ring's acquire and release) is
    retried at half the batch size; the slot it held must come back, or the retry waits for ever."""
    runner = fake_cuda_runner
    real_to = torch.Tensor.to
    failures = [1]

    def to(self, *args, **kwargs):
        if kwargs.get("non_blocking") and failures[0]:
            failures[0] -= 1
            raise torch.cuda.OutOfMemoryError("injected: out of memory allocating the device batch")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    tiles = _tiles(20)
    out: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: out.append(runner.submit(tiles).result()), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the ring hung on the slot taken before the injected error"
    assert failures == [0] and runner.batch_size == 4  # the error happened and the block was retried
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    expected = BatchRunner(DarknessClassifier(), TilePreprocessor(32, MEAN, STD), torch.device("cpu"), 8,
                           precision="off")(tiles)
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-6)


def test_events_the_host_waits_on_do_not_spin(fake_cuda_runner):
    fake_cuda_runner.submit(_tiles(20)).result()
    # batches of 7, 6 and 7 tiles: one copy event each, and one for the block's output
    assert len(_FakeEvent.made) == 4
    assert all(kw.get("blocking") is True for kw in _FakeEvent.made), _FakeEvent.made


def test_slides_starting_together_prepare_the_model_once(monkeypatch):
    calls = []
    real = optimize.prepare_for_inference

    def slow_prepare(model, device, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough for every thread to arrive while the first one prepares
        return real(model, device, **kwargs)

    monkeypatch.setattr(optimize, "prepare_for_inference", slow_prepare)
    model, start = DarknessClassifier(), threading.Barrier(4)
    got = []

    def slide() -> None:
        start.wait()
        got.append(prepared_model(model, torch.device("cpu"), "off")[0])

    threads = [threading.Thread(target=slide) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1, f"prepared {len(calls)} times"
    assert len(got) == 4 and all(m is got[0] for m in got)


def test_one_lock_and_one_prepared_copy_per_physical_device(monkeypatch):
    assert device_lock(torch.device("cuda")) is device_lock(torch.device("cuda:0"))
    assert device_lock(torch.device("cpu:0")) is device_lock(torch.device("cpu"))
    assert device_lock(torch.device("cuda:1")) is not device_lock(torch.device("cuda:0"))
    calls = []
    real = optimize.prepare_for_inference
    monkeypatch.setattr(optimize, "prepare_for_inference",
                        lambda model, device, **kw: calls.append(device) or real(model, device, **kw))
    model = DarknessClassifier()
    a = prepared_model(model, torch.device("cpu"), "off")[0]
    b = prepared_model(model, torch.device("cpu:0"), "off")[0]
    assert a is b and len(calls) == 1


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_cuda_takes_native_bf16_only(monkeypatch, native, expected):
    # V100 / T4: torch counts emulated bf16 as supported unless asked for native support only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or including_emulation)
    assert autocast_dtype(torch.device("cuda"), "auto") is expected


def test_a_compiled_model_runs_one_batch_shape():
    runner = BatchRunner(DarknessClassifier(), TilePreprocessor(32, MEAN, STD), torch.device("cpu"), 64,
                         compile="on")  # torch.compile is lazy: nothing compiles here
    assert runner.compiled
    assert {runner.padded(m) for m in range(1, 65)} == {64}
    eager = BatchRunner(DarknessClassifier(), TilePreprocessor(32, MEAN, STD), torch.device("cpu"), 64,
                        compile="off")
    assert [eager.padded(m) for m in (1, 17, 64)] == [1, 17, 64]


def test_cuda_graphs_are_refused_from_a_second_thread(monkeypatch):
    # prepared without a GPU: only the thread check is under test here
    monkeypatch.setattr(optimize, "prepare_for_inference", lambda model, device, **kw: model)
    model, device = DarknessClassifier(), torch.device("cuda:7")  # a device no other test uses
    assert prepared_model(model, device, "reduce-overhead")[1]  # the first thread may
    assert prepared_model(model, device, "reduce-overhead")[1]  # ... again
    errors = []

    def other_slide() -> None:
        try:
            prepared_model(model, device, "reduce-overhead")
        except ConfigError as exc:
            errors.append(exc)

    t = threading.Thread(target=other_slide)
    t.start()
    t.join(timeout=30)
    assert len(errors) == 1 and "reduce-overhead" in str(errors[0]) and "slides_per_gpu=1" in str(errors[0])
    # other compile modes stay allowed from any thread
    t = threading.Thread(target=lambda: errors.append(prepared_model(model, device, "on")))
    t.start()
    t.join(timeout=30)
    assert len(errors) == 2 and errors[1][0] is model
