"""The inner training loop: one optimiser update (SAM, AMP, AGC), one epoch, validation.

:mod:`wsi_cmaf.train.trainer` builds a :class:`RunContext` and, per stage, a :class:`StageRuntime`;
this module runs epochs on them. The loss of a batch depends on the stage:

* ``branches``: each extractor's temporary head (:class:`~wsi_cmaf.train.stages.BranchHeads`) with
  cross-entropy; the two losses are summed (they touch disjoint parameters);
* other stages: ``model.forward_with_aux`` (CMAF-Net) or a plain forward (timm baselines, empty aux),
  then plain cross-entropy or the :class:`~wsi_cmaf.losses.IBObjective`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import adaptive_clip_grad
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses import IBObjective
from wsi_cmaf.train.config import StageConfig, TrainConfig
from wsi_cmaf.train.data_setup import BatchPipeline, batch_patient_ids
from wsi_cmaf.train.datasets import DataBundle
from wsi_cmaf.train.evaluation import predict, quick_metrics
from wsi_cmaf.train.logging_utils import RunLogger, aux_statistics, per_class_grad_norms
from wsi_cmaf.train.sam import SAM
from wsi_cmaf.train.stages import set_train_mode

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- mixed precision
class Amp:
    """Autocast dtype and (fp16 only) the GradScaler of a run.

    ``auto``: fp16 + GradScaler on CUDA, full precision elsewhere; ``bf16``: bf16 autocast on any
    device, no scaler (bf16 has fp32's exponent range); ``off``: fp32.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.device = device
        self.dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        if mode == "bf16":
            self.dtype = torch.bfloat16
        elif mode == "fp16" or (mode == "auto" and device.type == "cuda"):
            if device.type != "cuda":
                raise ConfigError("amp 'fp16' needs a CUDA device; use 'bf16' or 'off' on CPU")
            self.dtype = torch.float16
            self.scaler = torch.amp.GradScaler("cuda")
        self._unscaled = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context (a no-op in full precision)."""
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled when a GradScaler is active."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: Optimizer, params: list[nn.Parameter]) -> bool:
        """Bring gradients back to true scale; return whether all of them are finite.

        GradScaler allows one ``unscale_`` per update; SAM's second backward pass therefore
        divides by the same scale by hand (the scale only changes in :meth:`update`).
        """
        if self.scaler is not None:
            if not self._unscaled:
                self.scaler.unscale_(optimizer)
                self._unscaled = True
            else:
                inv = 1.0 / self.scaler.get_scale()
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(inv)
        return grads_finite(params)

    def update(self, second_pass_overflow: bool = False) -> None:
        """End of an optimiser update: adapt the loss scale."""
        if self.scaler is not None:
            if second_pass_overflow:  # GradScaler did not see this overflow: back off by hand
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            else:
                self.scaler.update()
        self._unscaled = False


def grads_finite(params: list[nn.Parameter]) -> bool:
    """Whether every gradient of ``params`` is finite (one device sync)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but do not update their running ones.

    Used for SAM's second forward pass at the perturbed weights ``w + ε``: those statistics
    belong to weights the model never takes.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


# ----------------------------------------------------------------------------- run state
@dataclass
class RunContext:
    """Everything an epoch needs; built once by :func:`wsi_cmaf.train.trainer.train`."""

    config: TrainConfig
    device: torch.device
    model: nn.Module
    heads: nn.Module | None
    bundle: DataBundle
    pipeline: BatchPipeline
    amp: Amp
    run_logger: RunLogger
    progress: bool
    counters: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def prepare(self, split: str):
        """``prepare(images, indices)`` for :func:`~wsi_cmaf.train.evaluation.predict` on ``split``."""
        def fn(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return self.pipeline(x, batch_patient_ids(self.bundle, split, idx), train=False)
        return fn


@dataclass
class StageRuntime:
    """One stage's optimiser, schedule and objective."""

    stage: StageConfig
    index: int
    optimizer: Optimizer
    scheduler: LRScheduler
    objective: IBObjective | None
    steps_per_epoch: int
    clip_params: list[nn.Parameter]
    grad_params: list[nn.Parameter]  # parameters of the per-class gradient norms

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole stage."""
        return max(self.stage.epochs * self.steps_per_epoch, 1)

    def params(self) -> list[nn.Parameter]:
        """Every parameter the optimiser updates."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]


class BranchEnsemble(nn.Module):
    """Stage-1 validation model: the mean of the two branch heads' class probabilities.

    During stage 1 the fusion block and the real head are untrained, so validating the full
    network would measure noise; this judges what stage 1 actually trains.
    """

    def __init__(self, model: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the averaged probabilities (``softmax`` of it gives that average back)."""
        probs = torch.stack([F.softmax(v.float(), dim=1) for v in self.heads(self.model, x).values()])
        return probs.mean(0).clamp_min(1e-12).log()


# ----------------------------------------------------------------------------- one update
def batch_loss(ctx: RunContext, rt: StageRuntime, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, per-sample task loss, loss terms, aux) of one batch for the stage's kind."""
    stage = rt.stage
    if stage.trainable == "branches":
        assert ctx.heads is not None
        per_branch = {n: F.cross_entropy(v.float(), y, reduction="none") for n, v in ctx.heads(ctx.model, x).items()}
        per_sample = torch.stack(list(per_branch.values())).sum(0)
        terms = {f"loss/{n}": v.mean().detach() for n, v in per_branch.items()}
        return per_sample.mean(), per_sample, terms, {}
    if hasattr(ctx.model, "forward_with_aux"):
        logits, aux = ctx.model.forward_with_aux(x)
    else:
        logits, aux = ctx.model(x), {}
    logits = logits.float()
    if stage.loss == "cross_entropy" or rt.objective is None:
        per_sample = F.cross_entropy(logits, y, reduction="none")
        loss = per_sample.mean()
        return loss, per_sample, {"task": loss.detach()}, aux
    out = rt.objective(logits, y, aux)
    # The task loss per sample (for the per-class gradient norms), without the IB weights.
    per_sample = rt.objective.task_loss(logits, y)
    return out.total, per_sample, out.terms, aux


def optimizer_update(ctx: RunContext, rt: StageRuntime, x: torch.Tensor, y: torch.Tensor,
                     log: bool) -> tuple[torch.Tensor, dict[str, float], bool]:
    """One optimiser update (two passes with SAM) -> (loss at w, log values, whether it was applied)."""
    amp, opt = ctx.amp, rt.optimizer
    params = rt.params()
    opt.zero_grad(set_to_none=True)
    with amp.autocast():
        loss, per_sample, terms, aux = batch_loss(ctx, rt, x, y)
    values: dict[str, float] = {}
    if log:
        values.update({k: float(v) for k, v in terms.items()})
        values["total"] = float(loss.detach())
        values.update(aux_statistics(aux))
        values.update(per_class_grad_norms(per_sample, y, rt.grad_params, ctx.config.model.num_classes))
    del aux, per_sample
    amp.backward(loss)
    finite = amp.unscale(opt, params)
    if not finite:
        opt.zero_grad(set_to_none=True)
        amp.update()
        return loss.detach(), values, False
    clip = ctx.config.optim.agc_clip_factor
    if isinstance(opt, SAM):
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(ctx.model), amp.autocast():
            loss2 = batch_loss(ctx, rt, x, y)[0]
        amp.backward(loss2)
        if not amp.unscale(opt, params):
            restore_sam_weights(opt)
            opt.zero_grad(set_to_none=True)
            amp.update(second_pass_overflow=True)
            return loss.detach(), values, False
        # Clip the gradient that is actually applied (SAM normalises the first one anyway).
        if clip:
            adaptive_clip_grad(rt.clip_params, clip_factor=clip)
        opt.second_step(zero_grad=True)
        # The schedulers watch SAM.step() to warn about a wrong call order; we drive SAM's two
        # halves directly, so record that the optimiser did step.
        opt._opt_called = True  # type: ignore[attr-defined]
    else:
        if clip:
            adaptive_clip_grad(rt.clip_params, clip_factor=clip)
        if amp.scaler is not None:
            amp.scaler.step(opt)
        else:
            opt.step()
    amp.update()
    rt.scheduler.step()
    return loss.detach(), values, True


@torch.no_grad()
def restore_sam_weights(opt: SAM) -> None:
    """Undo SAM's ascent step without an optimiser step (used when the second pass overflowed)."""
    for group in opt.param_groups:
        for p in group["params"]:
            old = opt.state[p].pop("old_p", None)
            if old is not None:
                p.copy_(old)


# ----------------------------------------------------------------------------- epochs
def _epoch_seed(config: TrainConfig, epoch: int) -> int:
    # One seed per (run seed, epoch): a resumed run shuffles and augments exactly as an
    # uninterrupted one would, without carrying generator states across processes.
    return int(config.seed) * 100_003 + int(epoch)


def prepare_epoch_data(ctx: RunContext, epoch: int) -> None:
    """Seed this epoch's shuffling and augmentation."""
    loader = ctx.bundle.loaders["train"]
    seed = _epoch_seed(ctx.config, epoch)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seed)
    if ctx.pipeline.augment is not None:
        ctx.pipeline.augment.reseed(seed)


def train_epoch(ctx: RunContext, rt: StageRuntime, epoch: int, stage_epoch: int) -> dict[str, Any]:
    """Train one epoch of stage ``rt``; logs step rows; returns the epoch's training numbers."""
    cfg, c = ctx.config, ctx.counters
    stage = rt.stage
    set_train_mode(ctx.model, ctx.heads, stage.trainable)
    prepare_epoch_data(ctx, epoch)
    loader = ctx.bundle.loaders["train"]
    total_loss = torch.zeros((), device=ctx.device)
    done = skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(total=rt.steps_per_epoch, disable=not ctx.progress, leave=False, dynamic_ncols=True,
               desc=f"{stage.name} {stage_epoch}/{stage.epochs}", unit="step")
    try:
        for i, (x, y, idx) in enumerate(loader):
            if i >= rt.steps_per_epoch:
                break
            if len(y) < 2:  # a lone leftover sample: BatchNorm and the HSIC proxy need >= 2
                continue
            inp = ctx.pipeline(x.to(ctx.device, non_blocking=True), batch_patient_ids(ctx.bundle, "train", idx),
                               train=True)
            target = torch.as_tensor(y, device=ctx.device)
            if rt.objective is not None:
                rt.objective.update(c["stage_step"], rt.total_steps if stage.dynamic_weighting else None)
            log = c["global_step"] % max(cfg.log_every, 1) == 0
            loss, values, applied = optimizer_update(ctx, rt, inp, target, log)
            c["global_step"] += 1
            c["stage_step"] += 1
            if applied:
                total_loss += loss
                done += 1
            else:
                skipped += 1
                logger.warning("step %d: non-finite gradients, update skipped", c["global_step"])
            if log:
                ctx.run_logger.log("step", {"epoch": epoch, "stage": stage.name, "stage_epoch": stage_epoch,
                                            "step": c["global_step"], "stage_step": c["stage_step"],
                                            "lr": rt.optimizer.param_groups[0]["lr"], **values})
            bar.update(1)
            if log and "total" in values:
                bar.set_postfix(loss=f"{values['total']:.4f}")
    finally:
        bar.close()
    if done == 0 and skipped > 0:
        raise ConfigError(f"training diverged: every step of epoch {epoch} ({stage.name}) had non-finite "
                          "gradients; lower the learning rate or set amp: off")
    return {"train_loss": float(total_loss) / max(done, 1), "steps": done, "skipped_steps": skipped,
            "lr": rt.optimizer.param_groups[0]["lr"], "train_seconds": time.perf_counter() - t0}


def validate(ctx: RunContext, stage: StageConfig) -> dict[str, float]:
    """Point metrics on the validation split (branch heads during stage 1)."""
    net: nn.Module = ctx.model
    if stage.trainable == "branches" and ctx.heads is not None:
        net = BranchEnsemble(ctx.model, ctx.heads)
    probs, labels, _ = predict(net, ctx.bundle.loaders["val"], ctx.prepare("val"), ctx.device, ctx.amp.dtype)
    return quick_metrics(probs, labels, ctx.config.model.positive_class)


def finite_or(value: Any, default: float) -> float:
    """``value`` as float, or ``default`` when it is missing or not finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def steps_per_epoch(bundle: DataBundle, config: TrainConfig) -> int:
    """Optimiser steps per epoch: one pass over train, capped by ``data.max_steps_per_epoch``."""
    n = len(bundle.loaders["train"])
    cap = config.data.max_steps_per_epoch
    return max(min(n, cap) if cap else n, 1)


def numpy_rng_state() -> dict[str, Any]:
    """NumPy's global RNG state as tensors and numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`numpy_rng_state`."""
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))
