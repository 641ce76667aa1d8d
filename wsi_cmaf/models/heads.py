"""Multi-task classification heads and a loss that tolerates missing labels.

A model with several tasks (e.g. ``{"malignancy": 2, "subtype": 8}`` for BreakHis) shares one
embedding and puts one linear head per task on it. :func:`multitask_loss` sums the per-head
losses and leaves out, per task, the samples whose label for that task is missing, so a manifest
may mix patches labelled only benign/malignant with patches that also carry a subtype.

Missing labels: ``-1`` (or any negative value) in an integer target, ``NaN`` in a float target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_cmaf.errors import DataError, ModelConfigError

logger = logging.getLogger(__name__)

__all__ = ["MISSING_LABEL", "TaskHeads", "check_tasks", "label_present", "multitask_loss", "saved_task_classes"]

#: The integer label that marks "this sample has no label for this task".
MISSING_LABEL = -1


def check_tasks(tasks: Mapping[str, int]) -> dict[str, int]:
    """Validate ``{task name: number of classes}`` (non-empty, names unique strings, classes >= 1)."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise ModelConfigError(f"tasks must be a non-empty mapping name -> number of classes, got {tasks!r}")
    out: dict[str, int] = {}
    for name, n in tasks.items():
        if not isinstance(name, str) or not name:
            raise ModelConfigError(f"task names must be non-empty strings, got {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ModelConfigError(f"task {name!r} needs a positive int number of classes, got {n!r}")
        out[name] = n
    return out


def saved_task_classes(config: Any) -> dict[str, list[str]]:
    """``{task: class names}`` of a saved model's :class:`~wsi_cmaf.models.ModelConfig`, primary task first.

    A multi-task model lists its tasks in ``model_kwargs["tasks"]`` and their class names in
    ``model_kwargs["task_class_names"]`` (written by the trainer); a task without recorded names
    gets ``"0", "1", ...``, the primary task ``config.class_names``. A single-task model gives
    ``{"task": config.class_names}``.
    """
    kwargs = dict(getattr(config, "model_kwargs", None) or {})
    tasks = kwargs.get("tasks")
    if not tasks:
        return {"task": list(config.class_names)}
    names = dict(kwargs.get("task_class_names") or {})
    out: dict[str, list[str]] = {}
    for i, (task, n) in enumerate(check_tasks(tasks).items()):
        out[task] = list(config.class_names) if i == 0 else [str(c) for c in names.get(task, range(n))]
    return out


class TaskHeads(nn.Module):
    """One ``Dropout -> Linear`` head per task on a shared embedding.

    ``forward`` returns ``{task: logits (B, C_task)}`` in the order the tasks were given (the
    first task is the primary one, e.g. malignancy).
    """

    def __init__(self, in_dim: int, tasks: Mapping[str, int], dropout: float = 0.0) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks)
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(in_dim, n) for name, n in self.tasks.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, in_dim) -> {task: (B, C_task)}."""
        h = self.drop(feats)
        return {name: head(h) for name, head in self.heads.items()}


def label_present(target: torch.Tensor) -> torch.Tensor:
    """Boolean (B,) mask of samples that carry a label: not NaN (float) / not negative (int)."""
    if target.is_floating_point():
        return ~torch.isnan(target)
    return target >= 0


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target.long(), reduction="none")


def multitask_loss(
    logits: Mapping[str, torch.Tensor] | torch.Tensor,
    targets: Mapping[str, torch.Tensor] | torch.Tensor,
    weights: Mapping[str, float] | None = None,
    loss_fns: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over tasks of ``weight * mean per-sample loss over the samples labelled for that task``.

    Args:
        logits: ``{task: (B, C)}`` (a single tensor is the one task ``"task"``).
        targets: ``{task: (B,)}`` class indices; ``-1`` / ``NaN`` = no label for that task.
            A task present in ``logits`` but absent from ``targets`` is unlabelled for every sample.
        weights: per-task weights (default 1.0 each).
        loss_fns: per-task ``fn(logits (B, C), target (B,) long) -> (B,)`` per-sample losses
            (default cross-entropy); unlabelled samples reach them as class 0 and are masked out.

    Returns:
        ``(total, {task: loss})``. A task without any labelled sample in the batch contributes an
        exact 0 that still depends on the logits (no NaN, and the graph stays connected).
    """
    if isinstance(logits, torch.Tensor):
        logits = {"task": logits}
    if isinstance(targets, torch.Tensor):
        targets = {"task": targets}
    unknown = sorted(set(targets) - set(logits))
    if unknown:
        raise DataError(f"labels given for task(s) {unknown} that the model has no head for; "
                        f"its tasks are {sorted(logits)}")
    weights = dict(weights or {})
    loss_fns = dict(loss_fns or {})
    per_task: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for name, out in logits.items():
        target = targets.get(name)
        if target is None:
            loss = out.sum() * 0.0
        else:
            if target.shape[0] != out.shape[0]:
                raise DataError(f"task {name!r}: {target.shape[0]} labels for a batch of {out.shape[0]}")
            keep = label_present(target)
            # Unlabelled samples get placeholder class 0 and are masked out after the per-sample
            # loss: no boolean indexing, so no host sync and a static shape per step.
            safe = torch.where(keep, target, torch.zeros_like(target)).long()
            fn = loss_fns.get(name, _cross_entropy)
            per_sample = torch.where(keep, fn(out, safe), out.new_zeros(()))
            loss = per_sample.sum() / keep.sum().clamp_min(1).to(per_sample.dtype)
        per_task[name] = loss
        term = float(weights.get(name, 1.0)) * loss
        total = term if total is None else total + term
    assert total is not None  # logits is never empty: a model has at least one task
    return total, per_task
