"""Sharpness-Aware Minimization (Foret et al., ICLR 2021), with the adaptive variant (ASAM, Kwon et al. 2021).

SAM minimises ``max_{‖ε‖ ≤ ρ} L(w + ε)``. Each update takes two forward/backward passes:

1. gradient ``g = ∇L(w)``; ascend to ``w + ε`` with ``ε = ρ · T² g / ‖T g‖`` (``T = I`` for SAM,
   ``T = diag(|w|)`` for adaptive SAM), remembering ``w``;
2. gradient ``∇L(w + ε)``; restore ``w`` exactly, then let the base optimizer (e.g. AdamW) step
   from ``w`` with that gradient.

The paper (Sec. 4.5) trains with AdamW + SAM. Hand-rolled (it is ~60 lines) rather than added as a
dependency: torch has no SAM, and the training loop needs the two halves separately (mixed precision,
gradient clipping between them). Usage::

    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4, weight_decay=0.05)

    # explicit form
    loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

    # closure form (the closure must zero grads, compute the loss, call backward, return the loss)
    loss = opt.step(closure)

Learning-rate schedulers may wrap the SAM object: it shares ``param_groups`` with the base optimizer.
BatchNorm running statistics are updated by both forward passes; a training loop that cares can put
the BatchNorm layers in eval mode for the second pass.

Both halves work on all parameters at once (``torch._foreach_*``) and never read a value back to
the host: a non-finite gradient is handled on the device. ``first_step`` then applies no
perturbation, and ``second_step(found_inf=...)`` restores ``w`` and lets the base optimiser skip
its update on the device (:func:`step_unless_nonfinite`), so a training step needs no sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from wsi_cmaf.errors import ConfigError

__all__ = ["SAM", "nonfinite_flag", "step_unless_nonfinite"]


def nonfinite_flag(params: Iterable[Tensor]) -> Tensor:
    """0-d float32 tensor on the parameters' device: 1.0 if any gradient is NaN/inf, else 0.0.

    Stays on the device (no sync): one ``_foreach_norm`` over every gradient; a NaN or inf element
    makes its tensor's norm non-finite.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)
    norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)])
    return (~torch.isfinite(norms).all()).to(torch.float32)


def step_unless_nonfinite(optimizer: Optimizer, found_inf: Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` (0-d float, 1.0 = skip) is set.

    Optimisers with ``_step_supports_amp_scaling`` (fused Adam, AdamW, SGD) skip on the device:
    they take ``found_inf`` the same way ``GradScaler.step`` hands it to them, and leave
    weights, moments and the step count untouched when it is set. Others need one host sync.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale = None  # type: ignore[attr-defined]  # gradients are already unscaled
        optimizer.found_inf = found_inf.to(torch.float32).reshape(())  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif not bool(found_inf):
        optimizer.step()


class SAM(Optimizer):
    """SAM wrapper around any ``torch.optim`` optimizer class.

    Args:
        params: parameters or parameter groups (groups may set their own ``rho``/``adaptive``).
        base_optimizer: optimizer *class* (or factory) called as ``base_optimizer(param_groups, **kwargs)``.
        rho: radius of the neighbourhood (0.05 in Foret et al.; ASAM typically uses ~0.5-2.0).
        adaptive: scale-invariant adaptive SAM (ε ∝ w² ⊙ g).
        eps: added to the gradient norm so that a zero gradient gives a zero perturbation.
        **kwargs: forwarded to the base optimizer (``lr``, ``weight_decay``, ...).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eps: float = 1e-12,
        **kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ConfigError(f"SAM rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=float(rho), adaptive=bool(adaptive), **kwargs))
        self.eps = float(eps)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        # Share the group dicts: schedulers changing group["lr"] on SAM reach the base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._saved: list[tuple[list[Tensor], list[Tensor]]] = []  # (params, copies of w) between the halves

    def _groups_with_grad(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """(group, params, grads) of every group, restricted to parameters that have a gradient."""
        out = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                out.append((group, ps, [p.grad for p in ps]))
        return out

    @torch.no_grad()
    def _grad_norm(self, groups: Sequence[tuple[dict[str, Any], list[Tensor], list[Tensor]]] | None = None
                   ) -> Tensor:
        """‖T g‖₂ over all parameters with a gradient (on the first parameter's device)."""
        groups = self._groups_with_grad() if groups is None else groups
        if not groups:
            return torch.zeros(())
        device = groups[0][1][0].device
        norms: list[Tensor] = []
        for group, ps, gs in groups:
            tg = torch._foreach_mul(torch._foreach_abs(ps), gs) if group["adaptive"] else gs
            norms.extend(n.to(device) for n in torch._foreach_norm(tg))
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> Tensor:
        """Move every parameter to ``w + ε`` (ascent step) and remember ``w``; needs gradients at ``w``.

        Returns a 0-d float tensor, 1.0 when the gradient was not finite: then ``ε = 0`` (the
        second pass runs at ``w`` and no NaN reaches the weights or BatchNorm statistics).
        """
        groups = self._groups_with_grad()
        if not groups:
            self._saved = []
            return torch.zeros((), dtype=torch.float32, device=self.param_groups[0]["params"][0].device)
        grad_norm = self._grad_norm(groups)
        finite = torch.isfinite(grad_norm)
        self._saved = []
        for group, ps, gs in groups:
            scale = torch.where(finite, group["rho"] / (grad_norm + self.eps), 0.0)
            e_w = torch._foreach_mul(torch._foreach_mul(ps, ps), gs) if group["adaptive"] else list(gs)
            e_w = torch._foreach_mul(e_w, scale)
            # NaN * 0 is NaN: zero the non-finite entries in one kernel over a flat copy (there is
            # no foreach nan_to_num); a finite gradient is left exactly as it was.
            flat = torch.cat([e.reshape(-1) for e in e_w]).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            old = [torch.empty_like(p) for p in ps]
            torch._foreach_copy_(old, ps)
            torch._foreach_add_(ps, [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in ps]), ps)])
            self._saved.append((ps, old))
        if zero_grad:
            self.zero_grad()
        return (~finite).to(torch.float32)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights ``w`` saved by :meth:`first_step` (bit for bit); no optimiser step."""
        for ps, old in self._saved:
            torch._foreach_copy_(ps, old)
        self._saved = []

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, found_inf: Tensor | None = None) -> None:
        """Restore ``w`` exactly, then take the base optimizer's step with the gradient at ``w + ε``.

        ``found_inf`` (0-d float, 1.0 = a pass had non-finite gradients): the base step is skipped
        on the device (:func:`step_unless_nonfinite`), leaving weights and optimiser state as they were.
        """
        self.restore()
        if found_inf is None:
            self.base_optimizer.step()
        else:
            step_unless_nonfinite(self.base_optimizer, found_inf)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """Full SAM update. ``closure`` must zero grads, compute the loss, ``backward()`` and return it.

        It is called twice (at ``w`` and at ``w + ε``); the loss at ``w`` is returned.
        """
        if closure is None:
            raise ConfigError("SAM.step needs a closure (or call first_step/second_step yourself)")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (SAM's copies of ``w`` are transient and not saved)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; keeps ``param_groups`` shared."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
