"""Learning-rate schedules of the three training stages (Sec. 4.5), built from ``torch.optim.lr_scheduler``.

* stage 1 — cosine annealing (:func:`cosine`, optionally with warm-up: :func:`warmup_cosine`);
* stage 2 — linear warm-up to the base rate, then constant (:func:`warmup`);
* stage 3 — cyclic learning rate (:func:`cyclic`).

All schedules are *per optimiser step* (call ``scheduler.step()`` after every ``optimizer.step()``),
and work on :class:`~wsi_cmaf.train.engine.sam.SAM` as well as on plain optimizers. The IB β ramp is
:func:`wsi_cmaf.losses.objective.beta_ramp` (re-exported here for convenience).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CyclicLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses.objective import beta_ramp

__all__ = ["SCHEDULES", "beta_ramp", "build_scheduler", "constant", "cosine", "cyclic", "warmup", "warmup_cosine"]


def _check_steps(**steps: int) -> None:
    for name, value in steps.items():
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an int >= 0, got {value!r}")


def constant(optimizer: Optimizer) -> LRScheduler:
    """Keep the optimizer's learning rate (a no-op scheduler, so the loop code stays uniform)."""
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


def cosine(optimizer: Optimizer, total_steps: int, eta_min: float = 0.0) -> LRScheduler:
    """Cosine annealing from the optimizer's lr to ``eta_min`` over ``total_steps`` steps."""
    _check_steps(total_steps=total_steps)
    return CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=eta_min)


def warmup(optimizer: Optimizer, warmup_steps: int, start_factor: float = 0.01) -> LRScheduler:
    """Linear warm-up from ``start_factor·lr`` to ``lr`` over ``warmup_steps``, then constant."""
    _check_steps(warmup_steps=warmup_steps)
    if not 0.0 < start_factor <= 1.0:
        raise ConfigError(f"warm-up start_factor must be in (0, 1], got {start_factor}")
    if warmup_steps == 0:
        return constant(optimizer)
    return LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    start_factor: float = 0.01,
    eta_min: float = 0.0,
) -> LRScheduler:
    """Linear warm-up for ``warmup_steps``, then cosine annealing to ``eta_min`` until ``total_steps``."""
    _check_steps(total_steps=total_steps, warmup_steps=warmup_steps)
    if warmup_steps >= total_steps and total_steps > 0:
        raise ConfigError(f"warmup_steps ({warmup_steps}) must be < total_steps ({total_steps})")
    if warmup_steps == 0:
        return cosine(optimizer, total_steps, eta_min)
    return SequentialLR(
        optimizer,
        schedulers=[
            warmup(optimizer, warmup_steps, start_factor),
            CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=eta_min),
        ],
        milestones=[warmup_steps],
    )


def cyclic(
    optimizer: Optimizer,
    step_size_up: int,
    max_lr: float | None = None,
    base_lr: float | None = None,
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular",
    step_size_down: int | None = None,
    gamma: float = 1.0,
) -> LRScheduler:
    """Cyclic learning rate (Smith, 2017) between ``base_lr`` and ``max_lr``.

    Defaults: ``max_lr`` = the optimizer's current lr (the paper's stage-3 rate 1e-5 is the peak),
    ``base_lr = max_lr / 10``. ``mode`` in {"triangular", "triangular2", "exp_range"}. Momentum is not
    cycled (AdamW has no ``momentum`` key; cycling ``betas`` is not something the paper asks for).
    """
    _check_steps(step_size_up=step_size_up)
    if step_size_up == 0:
        raise ConfigError("step_size_up must be >= 1")
    if mode not in ("triangular", "triangular2", "exp_range"):
        raise ConfigError(f"cyclic mode must be triangular, triangular2 or exp_range, got {mode!r}")
    peak = [g["lr"] for g in optimizer.param_groups] if max_lr is None else max_lr
    low = base_lr if base_lr is not None else ([p / 10 for p in peak] if isinstance(peak, list) else peak / 10)
    lows = low if isinstance(low, list) else [low] * len(optimizer.param_groups)
    peaks = peak if isinstance(peak, list) else [peak] * len(optimizer.param_groups)
    if any(lo > hi for lo, hi in zip(lows, peaks)):
        raise ConfigError(f"cyclic base_lr {low} must not exceed max_lr {peak}")
    return CyclicLR(
        optimizer,
        base_lr=lows,
        max_lr=peaks,
        step_size_up=step_size_up,
        step_size_down=step_size_down,
        mode=mode,
        gamma=gamma,
        cycle_momentum=False,
    )


SCHEDULES = ("constant", "cosine", "warmup", "warmup_cosine", "cyclic")


def build_scheduler(name: str, optimizer: Optimizer, **kwargs: Any) -> LRScheduler:
    """Build a schedule by name (one of :data:`SCHEDULES`) with that function's keyword arguments."""
    factories: dict[str, Callable[..., LRScheduler]] = {
        "constant": constant,
        "cosine": cosine,
        "warmup": warmup,
        "warmup_cosine": warmup_cosine,
        "cyclic": cyclic,
    }
    key = name.strip().lower().replace("-", "_")
    if key not in factories:
        raise ConfigError(f"unknown lr schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    try:
        return factories[key](optimizer, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for lr schedule {key!r}: {exc}") from exc
