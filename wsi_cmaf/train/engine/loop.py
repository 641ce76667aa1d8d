"""The inner training loop: one optimiser update (SAM, AMP, AGC), one epoch, validation.

:mod:`wsi_cmaf.train.engine.trainer` builds a :class:`RunContext` and, per stage, a :class:`StageRuntime`;
this module runs epochs on them. The loss of a batch depends on the stage:

* ``branches``: each extractor's temporary head (:class:`~wsi_cmaf.train.engine.stages.BranchHeads`) with
  cross-entropy; the two losses are summed (they touch disjoint parameters);
* other stages: ``model.forward_with_aux`` (CMAF-Net) or a plain forward (timm baselines, empty aux),
  then plain cross-entropy or the :class:`~wsi_cmaf.losses.IBObjective`.

A multi-task model's primary task goes through that same loss; each secondary task adds a masked
cross-entropy (:mod:`wsi_cmaf.train.engine.tasks`). In the ``branches`` stage only the primary
labels train the extractors' temporary heads.

Mixed precision (:class:`Amp`, :class:`SkipMonitor`, :func:`resolve_precision`) lives in
:mod:`wsi_cmaf.train.engine.amp`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from wsi_cmaf.losses import IBObjective
from wsi_cmaf.train.config import StageConfig, TrainConfig
from wsi_cmaf.train.data.datasets import DataBundle
from wsi_cmaf.train.data.setup import BatchPipeline, batch_patient_ids
from wsi_cmaf.train.engine.amp import Amp, SkipMonitor
from wsi_cmaf.train.engine.clipping import AdaptiveGradClip, HistoryGradClip
from wsi_cmaf.train.engine.logging_utils import RunLogger, aux_statistics, per_class_grad_norms
from wsi_cmaf.train.engine.sam import SAM, nonfinite_flag, step_unless_nonfinite
from wsi_cmaf.train.engine.stages import frozen_bn_stats, set_train_mode
from wsi_cmaf.train.engine.tasks import (
    add_task_losses,
    is_multitask,
    predict_tasks,
    secondary_metrics,
    split_task_logits,
)
from wsi_cmaf.train.evaluate.predict import predict, quick_metrics


# ----------------------------------------------------------------------------- run state
@dataclass
class RunContext:
    """Everything an epoch needs; built once by :func:`wsi_cmaf.train.engine.trainer.train`."""

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
    monitor: SkipMonitor | None = None  # made from ``device`` when not given

    def __post_init__(self) -> None:
        if self.monitor is None:
            self.monitor = SkipMonitor(self.device)

    def prepare(self, split: str):
        """``prepare(images, indices)`` for :func:`~wsi_cmaf.train.evaluate.predict.predict` on ``split``."""
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
    clipper: AdaptiveGradClip | HistoryGradClip | None  # gradient clipping (None: off)
    grad_params: list[nn.Parameter]  # parameters of the per-class gradient norms
    task_weights: dict[str, float] = field(default_factory=dict)  # secondary tasks' loss weights (default 1)

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
def batch_loss(ctx: RunContext, rt: StageRuntime, x: torch.Tensor, y: torch.Tensor,
               tasks: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(loss, per-sample task loss, loss terms, aux) of one batch for the stage's kind.

    ``tasks``: ``{secondary task: labels (B,)}`` (-1 = none) for a multi-task model, whose
    per-sample loss and terms are then the primary task's plus ``loss/<task>`` terms.
    """
    stage = rt.stage
    if stage.trainable == "branches":
        assert ctx.heads is not None
        per_branch = {n: F.cross_entropy(v.float(), y, reduction="none") for n, v in ctx.heads(ctx.model, x).items()}
        per_sample = torch.stack(list(per_branch.values())).sum(0)
        terms = {f"loss/{n}": v.mean().detach() for n, v in per_branch.items()}
        return per_sample.mean(), per_sample, terms, {}
    forward_with_aux = getattr(ctx.model, "forward_with_aux", None)
    if forward_with_aux is not None:
        logits, aux = forward_with_aux(x)
    else:
        logits, aux = ctx.model(x), {}
    secondary = None
    if isinstance(logits, dict):
        primary = next(iter(logits))
        logits, secondary = split_task_logits(logits)
    logits = logits.float()
    if stage.loss == "cross_entropy" or rt.objective is None:
        per_sample = F.cross_entropy(logits, y, reduction="none")
        loss = per_sample.mean()
        terms = {"task": loss.detach()}
    else:
        out = rt.objective(logits, y, aux)
        # The task loss per sample (for the per-class gradient norms), without the IB weights.
        per_sample = rt.objective.task_loss(logits, y)
        loss, terms = out.total, out.terms
    if secondary is not None:
        loss, terms = add_task_losses(loss, terms, primary, secondary, tasks, rt.task_weights)
    return loss, per_sample, terms, aux


def _batch_loss(ctx: RunContext, rt: StageRuntime, x: torch.Tensor, y: torch.Tensor,
                tasks: dict[str, torch.Tensor] | None):
    # Single-task calls keep batch_loss's four-argument form: tests and tools replace the function.
    return batch_loss(ctx, rt, x, y) if tasks is None else batch_loss(ctx, rt, x, y, tasks)


def micro_batches(x: torch.Tensor, y: torch.Tensor, micro: int | None
                  ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Split a batch for gradient accumulation: ``[(x_i, y_i, w_i)]`` with ``w_i = len_i / len``.

    ``micro`` None or >= the batch: one chunk of weight 1. Otherwise ``ceil(len/micro)`` chunks of
    near-equal size (they differ by at most one sample), never fewer than 2 samples each (BatchNorm
    and the HSIC estimate need 2): a short last batch of an epoch is split into fewer chunks. The
    sizes come from the shape, so splitting needs no host sync.
    """
    k = _chunk_count(len(y), micro)
    if k == 0:
        return [(x, y, 1.0)]
    n = len(y)
    return [(xc, yc, len(yc) / n) for xc, yc in zip(x.tensor_split(k), y.tensor_split(k))]


def _chunk_count(n: int, micro: int | None) -> int:
    """Micro-batches of a batch of ``n`` (0: no split); see :func:`micro_batches`."""
    if micro is None or n <= micro:
        return 0
    return max(1, min(-(-n // micro), n // 2))


def split_task_targets(tasks: dict[str, torch.Tensor] | None, n: int, micro: int | None
                       ) -> list[dict[str, torch.Tensor] | None]:
    """The secondary-task labels cut into the same micro-batches as :func:`micro_batches` cuts ``y``."""
    k = _chunk_count(n, micro)
    if tasks is None:
        return [None] * max(k, 1)
    if k == 0:
        return [tasks]
    parts = {t: v.tensor_split(k) for t, v in tasks.items()}
    return [{t: parts[t][i] for t in tasks} for i in range(k)]


def optimizer_update(ctx: RunContext, rt: StageRuntime, x: torch.Tensor, y: torch.Tensor,
                     log: bool, tasks: dict[str, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """One optimiser update (two passes with SAM) -> (loss at w, log values, found_inf).

    With ``data.micro_batch_size`` smaller than the batch, each pass runs over micro-batches and
    accumulates their gradients, each micro-batch's loss weighted by its share of the batch, so
    the applied gradient is that of the batch-mean loss (Sec. 5.3: 128 = 2 × 64). SAM perturbs
    the weights once, with the whole batch's gradient. Logged values (loss terms, aux statistics,
    per-class gradient norms) are those of the first micro-batch.

    ``found_inf`` (0-d float on the device) is 1.0 when a pass had non-finite gradients; the
    update was then skipped on the device: weights and optimiser state are unchanged. Nothing is
    read back to the host unless ``log`` (the logged values) or the optimiser cannot skip on device.
    ``tasks``: secondary-task labels of a multi-task model (see :func:`batch_loss`).
    """
    amp, opt = ctx.amp, rt.optimizer
    params = rt.params()
    data = getattr(ctx.config, "data", None)  # minimal contexts (unit tests) carry no data section
    micro = data.micro_batch_size if data is not None else None
    chunks = micro_batches(x, y, micro)
    task_chunks = split_task_targets(tasks, len(y), micro)
    accumulate = len(chunks) > 1
    opt.zero_grad(set_to_none=True)
    values: dict[str, float] = {}
    total: torch.Tensor | None = None
    for i, ((xc, yc, weight), tc) in enumerate(zip(chunks, task_chunks)):
        with amp.autocast():
            loss, per_sample, terms, aux = _batch_loss(ctx, rt, xc, yc, tc)
        if log and i == 0:
            values.update({k: float(v) for k, v in terms.items()})
            values["total"] = float(loss.detach())
            values.update(aux_statistics(aux))
            values.update(per_class_grad_norms(per_sample, yc, rt.grad_params, ctx.config.model.num_classes))
        del aux, per_sample
        if accumulate:
            loss = loss * weight
        amp.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    assert total is not None
    amp.unscale(opt)
    if isinstance(opt, SAM):
        found = opt.first_step(zero_grad=True)  # no perturbation when the gradient is not finite
        for (xc, yc, weight), tc in zip(chunks, task_chunks):
            with frozen_bn_stats(ctx.model), amp.autocast():
                loss2 = _batch_loss(ctx, rt, xc, yc, tc)[0]
            amp.backward(loss2 * weight if accumulate else loss2)
        amp.unscale(opt.base_optimizer)
        found = torch.maximum(found, nonfinite_flag(params))
        # Clip the gradient that is actually applied (SAM normalises the first one anyway).
        if rt.clipper is not None:
            rt.clipper()
        opt.second_step(zero_grad=True, found_inf=found)
        # The schedulers watch SAM.step() to warn about a wrong call order; we drive SAM's two
        # halves directly, so record that the optimiser did step.
        opt._opt_called = True  # type: ignore[attr-defined]
    else:
        found = nonfinite_flag(params)
        if rt.clipper is not None:
            rt.clipper()
        step_unless_nonfinite(opt, found)
    amp.update()
    # The schedule advances with every update, skipped or not (as in torch's AMP recipe): knowing
    # whether it was skipped would need a host sync, and the schedule stays a function of the step.
    rt.scheduler.step()
    return total, values, found


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
    monitor = ctx.monitor
    assert monitor is not None
    monitor.reset_epoch()
    steps = 0
    t0 = time.perf_counter()
    bar = tqdm(total=rt.steps_per_epoch, disable=not ctx.progress, leave=False, dynamic_ncols=True,
               desc=f"{stage.name} {stage_epoch}/{stage.epochs}", unit="step")
    try:
        for i, batch in enumerate(loader):
            x, y, idx = batch[0], batch[1], batch[2]  # a multi-task batch has {task: labels} as batch[3]
            if i >= rt.steps_per_epoch:
                break
            if len(y) < 2:  # a lone leftover sample: BatchNorm and the HSIC proxy need >= 2
                continue
            inp = ctx.pipeline(x.to(ctx.device, non_blocking=True), batch_patient_ids(ctx.bundle, "train", idx),
                               train=True)
            # non_blocking: a blocking copy waits for the whole queued step before the host goes on
            target = torch.as_tensor(y).to(ctx.device, non_blocking=True)
            tasks = ({t: torch.as_tensor(v).to(ctx.device, non_blocking=True) for t, v in batch[3].items()}
                     if len(batch) > 3 else None)
            if rt.objective is not None:
                rt.objective.update(c["stage_step"], rt.total_steps if stage.dynamic_weighting else None)
            log = c["global_step"] % max(cfg.log_every, 1) == 0
            loss, values, found = optimizer_update(ctx, rt, inp, target, log, tasks)
            monitor.record(found, loss)
            c["global_step"] += 1
            c["stage_step"] += 1
            steps += 1
            if log:  # a step that syncs anyway (logged values): read the skip counters too
                monitor.check(ctx.amp, f"epoch {epoch} ({stage.name}), step {c['global_step']}")
                ctx.run_logger.log("step", {"epoch": epoch, "stage": stage.name, "stage_epoch": stage_epoch,
                                            "step": c["global_step"], "stage_step": c["stage_step"],
                                            "lr": rt.optimizer.param_groups[0]["lr"], **values})
            bar.update(1)
            if log and "total" in values:
                bar.set_postfix(loss=f"{values['total']:.4f}")
    finally:
        bar.close()
    skipped, _ = monitor.check(ctx.amp, f"epoch {epoch} ({stage.name})", steps=steps)
    done = steps - skipped
    train_loss = float(monitor.loss_sum) / done if done else math.nan
    return {"train_loss": train_loss, "steps": done, "skipped_steps": skipped,
            "lr": rt.optimizer.param_groups[0]["lr"], "train_seconds": time.perf_counter() - t0}


def validate(ctx: RunContext, stage: StageConfig) -> dict[str, float]:
    """Point metrics on the validation split (branch heads during stage 1).

    A multi-task model is judged on its primary task (same keys as a single-task model, so model
    selection is unchanged) plus ``<task>/balanced_accuracy``, ``<task>/macro_f1`` and
    ``<task>/n_labelled`` of each secondary task over its labelled samples.
    """
    net: nn.Module = ctx.model
    if stage.trainable == "branches" and ctx.heads is not None:
        net = BranchEnsemble(ctx.model, ctx.heads)
    elif is_multitask(ctx.model):
        all_probs, all_labels, _ = predict_tasks(ctx.model, ctx.bundle.loaders["val"], ctx.prepare("val"),
                                                 ctx.device, ctx.amp.dtype)
        primary = next(iter(all_probs))
        return {**quick_metrics(all_probs[primary], all_labels[primary], ctx.config.model.positive_class),
                **secondary_metrics(all_probs, all_labels)}
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
