"""Learning-rate schedule factories: warm-up, cosine, cyclic; they drive SAM's base optimizer too."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.engine.sam import SAM
from wsi_cmaf.train.engine.schedules import SCHEDULES, beta_ramp, build_scheduler, cosine, cyclic, warmup, warmup_cosine


def _opt(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr)


def _trace(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    """lr used at steps 0..n-1 (read before each scheduler.step())."""
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_matches_closed_form() -> None:
    opt = _opt(1e-3)
    lrs = _trace(opt, cosine(opt, total_steps=100, eta_min=1e-5), 101)
    for t in (0, 25, 50, 75, 100):
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 100)) / 2
        assert lrs[t] == pytest.approx(expected, rel=1e-6)


def test_warmup_then_constant() -> None:
    opt = _opt(1e-4)
    lrs = _trace(opt, warmup(opt, warmup_steps=10, start_factor=0.1), 20)
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[5] == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5))
    assert all(lr == pytest.approx(1e-4) for lr in lrs[10:])
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))


def test_warmup_cosine_is_continuous_and_ends_at_eta_min() -> None:
    opt = _opt(1e-3)
    lrs = _trace(opt, warmup_cosine(opt, total_steps=110, warmup_steps=10, start_factor=0.01, eta_min=0.0), 111)
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[10] == pytest.approx(1e-3)  # peak right after warm-up
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.5e-3, rel=1e-6)  # half-way through the cosine part
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)
    assert all(b <= a + 1e-15 for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after the peak
    with pytest.raises(ConfigError):
        warmup_cosine(_opt(), total_steps=10, warmup_steps=10)


def test_cyclic_triangular_between_bounds() -> None:
    opt = _opt(1e-5)
    lrs = _trace(opt, cyclic(opt, step_size_up=5), 21)
    assert lrs[0] == pytest.approx(1e-6)  # base_lr = max_lr / 10
    assert lrs[5] == pytest.approx(1e-5)  # peak after step_size_up
    assert lrs[10] == pytest.approx(1e-6)
    assert lrs[15] == pytest.approx(1e-5)
    assert min(lrs) >= 1e-6 - 1e-15 and max(lrs) <= 1e-5 + 1e-15
    halving = _trace(o := _opt(1e-5), cyclic(o, step_size_up=5, mode="triangular2"), 16)
    assert halving[15] == pytest.approx(1e-6 + 0.5 * (1e-5 - 1e-6))  # second peak is half as high
    with pytest.raises(ConfigError):
        cyclic(_opt(), step_size_up=5, max_lr=1e-5, base_lr=1e-4)


def test_schedule_drives_sam_base_optimizer() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    sam = SAM([p], torch.optim.SGD, lr=0.1)
    sched = cosine(sam, total_steps=10)

    def closure() -> torch.Tensor:
        sam.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        sam.step(closure)
        sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_build_scheduler_by_name_and_errors() -> None:
    for name, kw in [
        ("constant", {}), ("cosine", {"total_steps": 5}), ("warmup", {"warmup_steps": 2}),
        ("warmup-cosine", {"total_steps": 5, "warmup_steps": 1}), ("cyclic", {"step_size_up": 2}),
    ]:
        assert isinstance(build_scheduler(name, _opt(), **kw), torch.optim.lr_scheduler.LRScheduler)
    assert len(SCHEDULES) == 5
    with pytest.raises(ConfigError, match="unknown"):
        build_scheduler("step", _opt())
    with pytest.raises(ConfigError, match="bad arguments"):
        build_scheduler("cosine", _opt(), total=5)
    with pytest.raises(ConfigError):
        cosine(_opt(), total_steps=-1)
    assert beta_ramp(5, 10) == pytest.approx(0.5)
