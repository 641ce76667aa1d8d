"""Gradient accumulation (data.micro_batch_size): the applied update equals the whole batch's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.config import DataConfig, StageConfig
from wsi_cmaf.train.engine.loop import Amp, StageRuntime, micro_batches, optimizer_update
from wsi_cmaf.train.engine.sam import SAM
from wsi_cmaf.train.engine.schedules import build_scheduler

CPU = torch.device("cpu")


def test_micro_batch_split_sizes_and_weights() -> None:
    x = torch.arange(64.0)[:, None]
    chunks = micro_batches(x, torch.zeros(64, dtype=torch.long), 16)
    assert [len(c[1]) for c in chunks] == [16, 16, 16, 16] and [c[2] for c in chunks] == [0.25] * 4
    torch.testing.assert_close(torch.cat([c[0] for c in chunks]), x)  # order kept, nothing lost
    y9 = torch.zeros(9, dtype=torch.long)
    assert [len(c[1]) for c in micro_batches(x[:9], y9, 4)] == [3, 3, 3]
    # a short last batch: never a chunk of 1 (BatchNorm, HSIC need 2)
    assert [len(c[1]) for c in micro_batches(x[:5], y9[:5], 2)] == [3, 2]
    assert [c[2] for c in micro_batches(x[:3], y9[:3], 2)] == [1.0]
    assert [c[2] for c in micro_batches(x, torch.zeros(64, dtype=torch.long), None)] == [1.0]


def test_accumulation_steps_and_validation() -> None:
    assert DataConfig(synthetic={}, batch_size=128, micro_batch_size=64).accumulation_steps == 2
    assert DataConfig(synthetic={}, batch_size=100, micro_batch_size=64).accumulation_steps == 2
    assert DataConfig(synthetic={}, batch_size=32, micro_batch_size=64).accumulation_steps == 1
    assert DataConfig(synthetic={}, batch_size=32, micro_batch_size=None).accumulation_steps == 1
    with pytest.raises(ConfigError):
        DataConfig(synthetic={}, micro_batch_size=1).validate()


def _update(micro: int | None, sam: bool) -> list[torch.Tensor]:
    """Parameters after one update of a BN-free net with plain SGD (so Δw = −lr·g exactly)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    params = list(model.parameters())
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.5) if sam else torch.optim.SGD(params, lr=0.5)
    stage = StageConfig("s", 1, 0.5, trainable="all", loss="cross_entropy", ib="off", schedule="constant")
    rt = StageRuntime(stage, 0, opt, build_scheduler("constant", opt), None, 1, None, [])
    ctx = SimpleNamespace(amp=Amp("off", CPU), model=model, heads=None,
                          config=SimpleNamespace(model=SimpleNamespace(num_classes=2),
                                                 data=SimpleNamespace(micro_batch_size=micro)))
    loss, _, found = optimizer_update(ctx, rt, x, y, log=False)
    assert float(found) == 0.0
    return [p.detach().clone() for p in model.parameters()] + [loss]


@pytest.mark.parametrize("sam", [False, True])
def test_accumulated_update_equals_whole_batch_update(sam: bool) -> None:
    whole = _update(None, sam)
    for micro in (32, 16):
        for a, b in zip(_update(micro, sam), whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
