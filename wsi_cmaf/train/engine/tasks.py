"""Multi-task training pieces: secondary-task losses, predictions and metrics.

A multi-task model (:class:`~wsi_cmaf.models.multiview.MultiViewNet` with several ``tasks``)
returns ``{task: logits}``; the first task is the primary one. The training loop sends the
primary logits through the stage's loss exactly as for a single-task model (the IB objective with
A-CBFL, or cross-entropy) and adds, per secondary task, ``weight x`` a cross-entropy over the
samples labelled for that task (:func:`wsi_cmaf.models.heads.multitask_loss`: label -1 = none,
an exact zero gradient from those samples; a batch without any label for a task adds an exact 0).
Model selection, early stopping and the test report stay on the primary task; the secondary
tasks get their own metrics over their labelled samples only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_cmaf.models.heads import multitask_loss

logger = logging.getLogger(__name__)

__all__ = ["PrimaryTask", "add_task_losses", "is_multitask", "predict_tasks", "primary_view", "secondary_metrics",
           "split_task_logits", "task_metrics", "task_names"]

Prepare = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def task_names(model: nn.Module) -> list[str]:
    """The model's task names, primary first (empty for a single-task model)."""
    tasks = getattr(model, "tasks", None)
    return list(tasks) if isinstance(tasks, Mapping) and len(tasks) > 1 else []


def is_multitask(model: nn.Module) -> bool:
    """Whether ``model`` returns ``{task: logits}`` (more than one task head)."""
    return bool(task_names(model))


class PrimaryTask(nn.Module):
    """A multi-task model seen as its primary task: ``forward`` returns that task's logits only.

    Lets the single-task evaluation code (``predict``, the test report) run unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task = task_names(model)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of the primary task."""
        return self.model(x)[self.task]


def primary_view(model: nn.Module) -> nn.Module:
    """``model`` itself for a single-task model, else :class:`PrimaryTask` around it."""
    return PrimaryTask(model) if is_multitask(model) else model


def split_task_logits(logits: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``{task: logits}`` -> (primary logits, ``{secondary task: logits}``); the first task is primary."""
    items = list(logits.items())
    return items[0][1], dict(items[1:])


def add_task_losses(primary_loss: torch.Tensor, terms: dict[str, torch.Tensor], primary: str,
                    logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor] | None,
                    weights: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Primary loss + Σ weight x masked cross-entropy of each secondary task, and the log terms.

    Terms gain ``loss/<primary>`` (the primary loss as computed by the stage: objective or CE),
    ``loss/<task>`` (each secondary task's unweighted loss over its labelled samples) and
    ``labelled/<task>`` (how many samples of the batch carried that task's label).
    """
    targets = dict(targets or {})
    extra, per_task = multitask_loss({t: v.float() for t, v in logits.items()}, targets, weights=weights)
    out = dict(terms)
    out[f"loss/{primary}"] = primary_loss.detach()
    for task, value in per_task.items():
        out[f"loss/{task}"] = value.detach()
        target = targets.get(task)
        out[f"labelled/{task}"] = (target >= 0).sum().float() if target is not None else torch.zeros(())
    return primary_loss + extra, out


@torch.no_grad()
def predict_tasks(model: nn.Module, loader: Iterable, prepare: Prepare, device: torch.device,
                  autocast_dtype: torch.dtype | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Every task's class probabilities and labels over ``loader`` (batches ``(x, y, idx[, {task: y}])``).

    Returns ``({task: probs (N, C)}, {task: labels (N,)}, dataset indices (N,))``; the primary
    task's labels are ``y``, a secondary task's are -1 where a sample has none.
    """
    names = task_names(model)
    was = model.training
    model.eval()
    probs: dict[str, list[torch.Tensor]] = {t: [] for t in names}
    labels: dict[str, list[torch.Tensor]] = {t: [] for t in names}
    indices = []
    for batch in loader:
        x, y, idx = batch[0], batch[1], batch[2]
        extra = batch[3] if len(batch) > 3 else {}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(prepare(x.to(device), idx))
        y = torch.as_tensor(y)
        for i, task in enumerate(names):
            probs[task].append(torch.softmax(out[task].float(), dim=1).cpu())
            if i == 0:
                labels[task].append(y)
            else:
                labels[task].append(torch.as_tensor(extra[task]) if task in extra else torch.full_like(y, -1))
        indices.append(torch.as_tensor(idx))
    model.train(was)
    return ({t: torch.cat(v).numpy() for t, v in probs.items()}, {t: torch.cat(v).numpy() for t, v in labels.items()},
            torch.cat(indices).numpy())


def task_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Balanced accuracy and macro-F1 of a secondary task over its labelled samples (label >= 0).

    ``n_labelled`` says how many samples counted; with none, the two metrics are NaN.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score

    keep = labels >= 0
    n = int(keep.sum())
    if n == 0:
        return {"balanced_accuracy": float("nan"), "macro_f1": float("nan"), "n_labelled": 0}
    truth, pred = labels[keep], probs[keep].argmax(1)
    with warnings.catch_warnings():  # classes predicted but absent from the labels are expected on small splits
        warnings.simplefilter("ignore")
        bacc = float(balanced_accuracy_score(truth, pred))
        f1 = float(f1_score(truth, pred, average="macro", zero_division=0))
    return {"balanced_accuracy": bacc, "macro_f1": f1, "n_labelled": n}


def secondary_metrics(probs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{"<task>/<metric>": value}`` for every secondary task (the first task is skipped)."""
    out: dict[str, Any] = {}
    for task in list(probs)[1:]:
        out.update({f"{task}/{k}": v for k, v in task_metrics(probs[task], labels[task]).items()})
    return out
