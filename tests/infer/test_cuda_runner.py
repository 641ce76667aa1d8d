"""The CUDA path of the inference runner on a real device: the pinned rings with more blocks than
slots behind a slowed stream, the injected-error retry, and the per-stream position codes.
Every test here needs CUDA; benchmarks/gpu_check.sh runs this file on the GPU machine."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.models import DarknessClassifier
from wsi_cmaf.infer.runner import BatchRunner
from wsi_cmaf.preprocess import TilePreprocessor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (benchmarks/gpu_check.sh runs it on the GPU machine)")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: fp32 on both sides; the device's reductions and resize products differ from the CPU's in the
#: last bits only
ATOL = 1e-5


class SlowDarkness(DarknessClassifier):
    """DarknessClassifier whose every forward first keeps its CUDA stream busy (~1 ms or more)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(2_000_000)  # cycles: the device is behind the host for every batch
        return super().forward(x)


def _blocks(n_blocks: int, tiles: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (tiles, 50, 50, 3), dtype=np.uint8) for _ in range(n_blocks)]


def _cpu(blocks: list[np.ndarray]) -> list[np.ndarray]:
    runner = BatchRunner(DarknessClassifier(), TilePreprocessor(32, MEAN, STD), torch.device("cpu"), 16,
                         precision="off", compile="off")
    return [runner(b) for b in blocks]


def _stream_all(runner: BatchRunner, blocks: list[np.ndarray], ahead: int = 2) -> list[np.ndarray]:
    """Submit every block, reading results ``ahead`` blocks behind (as the streaming loop's writer does)."""
    pending, out = [], []
    for b in blocks:
        pending.append(runner.submit(b))
        if len(pending) > ahead:
            out.append(pending.pop(0).result())
    out.extend(p.result() for p in pending)
    return out


def _gpu_runner(model: nn.Module) -> BatchRunner:
    return BatchRunner(model, TilePreprocessor(32, MEAN, STD), torch.device("cuda"), 16, precision="off",
                       compile="off", inflight=2, outputs_in_flight=3)


def test_rings_with_more_blocks_than_slots_behind_a_slow_stream_equal_the_cpu():
    blocks = _blocks(12)  # 12 blocks x 3 batches through 2 input and 3 output slots
    runner = _gpu_runner(SlowDarkness())
    got = _stream_all(runner, blocks)
    torch.cuda.synchronize()
    for a, b in zip(got, _cpu(blocks)):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)
    assert runner.inputs.allocations <= 2 and runner.outputs.allocations <= 3  # reused, not grown


def test_injected_oom_between_acquire_and_release_is_retried_without_hanging(monkeypatch):
    blocks = _blocks(4)
    runner = _gpu_runner(SlowDarkness())
    real_to, failures = torch.Tensor.to, [1]

    def to(self, *args, **kwargs):
        if kwargs.get("non_blocking") and self.device.type == "cpu" and failures[0]:
            failures[0] -= 1
            raise torch.cuda.OutOfMemoryError("injected: out of memory allocating the device batch")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    out: list[list[np.ndarray]] = []
    worker = threading.Thread(target=lambda: out.append(_stream_all(runner, blocks)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the input ring hung after the retry"
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert failures == [0] and runner.batch_size == 8
    for a, b in zip(out[0], _cpu(blocks)):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def test_position_codes_are_cached_per_stream():
    from wsi_cmaf.models.contextual import _sincos_2d, sincos_2d

    dev = torch.device("cuda")
    s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    with torch.cuda.stream(s1):
        a = sincos_2d(7, 9, 64, dev, torch.float32)
        assert sincos_2d(7, 9, 64, dev, torch.float32) is a
    with torch.cuda.stream(s2):
        b = sincos_2d(7, 9, 64, dev, torch.float32)
    assert b is not a
    torch.cuda.synchronize()
    assert torch.equal(a, b) and torch.equal(a, _sincos_2d(7, 9, 64, dev, torch.float32))
