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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from wsi_cmaf.errors import ConfigError

__all__ = ["SAM"]


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

    @torch.no_grad()
    def _grad_norm(self) -> Tensor:
        """‖T g‖₂ over all parameters with a gradient (on the first parameter's device)."""
        norms = []
        device = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                device = device or p.device
                g = p.grad.abs() * p.abs() if group["adaptive"] else p.grad
                norms.append(g.norm(p=2).to(device))
        if not norms:
            return torch.zeros(())
        return torch.stack(norms).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter to ``w + ε`` (ascent step) and remember ``w``; needs gradients at ``w``."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + self.eps)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e_w = (p * p if group["adaptive"] else 1.0) * p.grad * scale.to(p.device)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` exactly, then take the base optimizer's step with the gradient at ``w + ε``."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)
        self.base_optimizer.step()
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
        """The base optimizer's state (the SAM ``old_p`` copies are transient and not saved)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; keeps ``param_groups`` shared."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
