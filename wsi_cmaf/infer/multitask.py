"""Multi-task models in the slide engine: one output row per tile for all tasks.

A multi-task model returns ``{task: logits (B, C_task)}``. The engine runs it through
:class:`TaskOutputs`, which concatenates the logits in the model's task order into one
``(B, sum C_task)`` tensor; the batch runner applies a softmax per task segment
(``BatchRunner(segments=...)``) and the writer thread splits each block's rows into the primary
task's chunk (the store's main image) and one chunk per other task (``tasks/<task>``). So every
task is computed in the same forward pass and written in the same streaming pass.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch
from torch import nn


class TaskOutputs(nn.Module):
    """``inputs -> cat([logits[t] for t in tasks], dim=1)`` for a model returning ``{task: logits}``."""

    def __init__(self, model: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return flatten_tasks(self.model(*inputs), self.tasks)


def flatten_tasks(out: torch.Tensor | dict[str, torch.Tensor], tasks: Sequence[str]) -> torch.Tensor:
    """One (B, sum C) tensor from a ``{task: logits}`` output, in ``tasks`` order (tensors pass through)."""
    if isinstance(out, torch.Tensor):
        return out
    return torch.cat([out[t] for t in tasks], dim=1)


_WRAPPED: weakref.WeakKeyDictionary[nn.Module, TaskOutputs] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def task_outputs(model: nn.Module, tasks: Sequence[str]) -> TaskOutputs:
    """The :class:`TaskOutputs` wrapper of ``model`` (cached per model, so a batch worker prepares
    and compiles it once for many slides)."""
    with _LOCK:
        hit = _WRAPPED.get(model)
        if hit is None or hit.tasks != list(tasks):
            hit = _WRAPPED[model] = TaskOutputs(model, tasks).eval()
        return hit


def segments(tasks: dict[str, list[str]], num_classes: int) -> tuple[int, ...]:
    """Widths of the softmax segments of an output row: one per task (primary first), or the
    single ``num_classes`` segment of a single-task model."""
    return tuple(len(c) for c in tasks.values()) if tasks else (int(num_classes),)
