"""Gradient clipping in training: unit-wise adaptive clipping (AGC, Brock et al. 2021) and clipping to a
multiple of the recent gradient-norm history; :func:`build_clipper` picks one from the optim config."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.models.heads import TaskHeads
from wsi_cmaf.train.config import OptimConfig
from wsi_cmaf.train.engine.stages import trainable_parameters


def agc_parameters(model: nn.Module, heads: nn.Module | None) -> list[nn.Parameter]:
    """Parameters adaptive gradient clipping applies to: all trainable ones except the final
    classifier layer(s) — Brock et al. (2021) found clipping the last linear layer hurts."""
    skip: set[int] = set()
    task_heads = getattr(model, "heads", None)
    if isinstance(task_heads, TaskHeads):  # every task's head is a final layer
        skip |= {id(p) for p in task_heads.parameters()}
    classifier = _classifier(model)
    if isinstance(classifier, nn.Module):
        skip |= {id(p) for p in classifier.parameters()}
    if heads is not None:
        skip |= {id(p) for p in heads.parameters()}
    return [p for p in trainable_parameters(model, heads) if id(p) not in skip]


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The final classifier's parameters (for cheap per-class gradient norms); the primary
    task's head for a multi-task model."""
    heads = getattr(model, "heads", None)
    if isinstance(heads, TaskHeads):
        return list(heads.heads[next(iter(heads.tasks))].parameters())
    classifier = _classifier(model)
    return list(classifier.parameters()) if isinstance(classifier, nn.Module) else []


def _classifier(model: nn.Module) -> object:
    """timm's ``get_classifier()``, else a torchvision-style ``fc``, else None."""
    get_classifier = getattr(model, "get_classifier", None)
    return get_classifier() if callable(get_classifier) else getattr(model, "fc", None)


class AdaptiveGradClip:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021) of many parameters at once.

    The maths of ``timm.utils.adaptive_clip_grad``: for each unit (output row of a weight with
    ndim > 1, else the whole tensor) with weight norm ``‖w‖`` and gradient norm ``‖g‖``, the
    gradient is scaled to ``max(‖w‖, eps) * clip_factor`` when ``‖g‖`` exceeds that. Not timm's
    function: it loops over the parameters in Python with ~9 small kernels each (CMAF-Net has 273
    parameter tensors: ~2,500 launches per step, launch-bound on a GPU); here gradients and
    weights are concatenated once and the unit norms come from one segmented sum, so a call is
    ~12 kernels whatever the model, with no host sync. Same numbers to ~1e-7 (the norms are
    summed in a different order).
    """

    def __init__(self, params: Iterable[nn.Parameter], clip_factor: float, eps: float = 1e-3) -> None:
        self.params = list(params)
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self._layout: dict[tuple, tuple[torch.Tensor, list[int], int]] = {}

    def _units(self, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int], int]:
        """(unit lengths on the device, numel per parameter, total numel), cached per parameter set."""
        key = tuple((id(p), tuple(p.shape)) for p in params)
        if key not in self._layout:
            lengths: list[int] = []
            for p in params:
                rows = p.shape[0] if p.ndim > 1 else 1
                lengths += [p.numel() // rows] * rows
            sizes = [p.numel() for p in params]
            self._layout[key] = (torch.tensor(lengths, device=params[0].device), sizes, sum(sizes))
        return self._layout[key]

    @staticmethod
    def _unit_norms(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # unsafe=True: skip the lengths check, which reads values back to the host
        return torch.segment_reduce(flat * flat, "sum", lengths=lengths, unsafe=True).sqrt()

    @torch.no_grad()
    def __call__(self) -> None:
        """Clip the gradients of the parameters in place."""
        params = [p for p in self.params if p.grad is not None and p.numel() > 0]
        if not params:
            return
        lengths, sizes, total = self._units(params)
        grads = [p.grad for p in params if p.grad is not None]  # every one: params were filtered on it
        g = torch.cat([t.reshape(-1) for t in grads])
        w = torch.cat([p.detach().reshape(-1) for p in params])
        max_norm = self._unit_norms(w, lengths).clamp_(min=self.eps).mul_(self.clip_factor)
        g_norm = self._unit_norms(g, lengths)
        # timm: where(g_norm < max_norm, g, g * (max_norm / g_norm.clamp(min=1e-6))); g * 1.0 == g
        factor = torch.where(g_norm < max_norm, 1.0, max_norm / g_norm.clamp(min=1e-6))
        g.mul_(factor.repeat_interleave(lengths, output_size=total))
        torch._foreach_copy_(grads, [v.view_as(t) for v, t in zip(g.split(sizes), grads)])


class HistoryGradClip:
    """Clip the global gradient norm to ``multiplier`` x the median of the last ``window`` norms.

    The paper clips "based on gradient norm history" without a formula; this is that idea in the
    form of AutoClip (Seetharaman et al. 2020), with the median as the robust statistic: one
    outlier step cannot move the threshold, while a steady drift of the norm is followed. The
    *unclipped* norm enters the history (as in AutoClip), non-finite norms do not (an AMP overflow
    step would otherwise poison it). The first step has no history and is not clipped.

    Everything stays on the device: the history is a ring buffer tensor (NaN = empty slot, ignored
    by ``nanmedian``) and the write position is a host counter of calls, so a call never reads a
    value back to the host (the training loop is sync-free).
    """

    def __init__(self, params: Iterable[nn.Parameter], window: int = 50, multiplier: float = 2.0) -> None:
        if window < 1 or not multiplier > 0:
            raise ConfigError(f"history clipping needs window >= 1 and multiplier > 0, got {window}, {multiplier}")
        self.params = list(params)
        self.window = int(window)
        self.multiplier = float(multiplier)
        self.calls = 0  # host-side: which ring slot to write, and whether any history exists
        self.history: torch.Tensor | None = None  # created on the gradients' device at the first call
        self.last_norm: torch.Tensor | None = None  # unclipped norm of the last call (for logging/tests)

    @torch.no_grad()
    def __call__(self) -> None:
        """Clip the gradients of the parameters in place and record their norm."""
        grads = [p.grad for p in self.params if p.grad is not None and p.numel() > 0]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        if self.history is None:
            self.history = torch.full((self.window,), float("nan"), device=norm.device)
        if self.calls > 0:
            threshold = torch.nanmedian(self.history) * self.multiplier
            # factor <= 1; a non-finite norm gives NaN here, but such a step is skipped anyway
            factor = (threshold / norm.clamp(min=1e-12)).clamp(max=1.0)
            factor = torch.where(torch.isfinite(threshold), factor, 1.0)  # all history non-finite
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))
        self.history[self.calls % self.window] = torch.where(torch.isfinite(norm), norm, float("nan"))
        self.last_norm = norm
        self.calls += 1

    def state_dict(self) -> dict[str, Any]:
        """The history, for a checkpoint (so a resumed run clips as the uninterrupted one)."""
        return {"calls": self.calls, "history": None if self.history is None else self.history.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (the history moves to the parameters' device)."""
        self.calls = int(state["calls"])
        hist = state.get("history")
        if hist is not None and len(hist) != self.window:
            raise ConfigError(f"clip history has {len(hist)} slots but clip_history_window is {self.window}")
        device = self.params[0].device if self.params else torch.device("cpu")
        self.history = None if hist is None else hist.to(device)


def build_clipper(optim: OptimConfig, model: nn.Module,
                  heads: nn.Module | None) -> AdaptiveGradClip | HistoryGradClip | None:
    """The gradient clipper the optim config asks for (None: no clipping).

    ``clip: agc`` with ``agc_clip_factor: null`` also means no clipping.
    History clipping covers every trainable parameter, as a global-norm clip does.
    """
    if optim.clip == "history":
        return HistoryGradClip(trainable_parameters(model, heads), optim.clip_history_window,
                               optim.clip_history_multiplier)
    if optim.clip == "agc" and optim.agc_clip_factor:
        return AdaptiveGradClip(agc_parameters(model, heads), optim.agc_clip_factor)
    return None
