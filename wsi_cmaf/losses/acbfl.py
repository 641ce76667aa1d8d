"""Adaptive Class-Balanced Focal Loss (A-CBFL), Eq. 14 of Ativi et al., Sci Rep 16, 9607 (2026).

.. math::

    L_i = -\\alpha_{y_i}(t)\\,(1 - p_{i,y_i})^{\\gamma_{y_i}} \\log p_{i,y_i} \\; - \\; \\lambda\\, H(p_i)

* ``γ_c = γ_base · (π_maj / π_c)^{1/4}`` with ``γ_base = 2`` (Sec. 4.4): the majority class gets
  ``γ_base`` and rarer classes focus harder, following the π_c^{-1/4} margin law (Eq. 7).
* ``α_c(t)`` moves *exponentially* from normalised inverse-frequency weights at ``t = 0`` to uniform
  weights at ``t = 1`` (``t`` = training progress). See :func:`acbfl_alpha` for the exact formula.
* Entropy term — **sign**: Eq. 14 writes ``+λ·H(p_i)`` and says it "provides label smoothing". Adding
  ``+λH`` to a loss that is *minimised* drives predictions towards one-hot (entropy minimisation,
  the opposite of smoothing). The behaviour the paper describes (better calibration, less
  over-confidence) is the confidence penalty of Pereyra et al. (2017), ``−λH(p)``, which for
  small λ acts like label smoothing towards the uniform distribution. We therefore **subtract**
  ``λ·H(p_i)``. Passing a negative ``lambda_smooth`` reproduces the literal ``+|λ|H`` of Eq. 14.
  The **default is λ = 0**: with γ_c >= 2 any confidence penalty caps the optimum of a correct
  prediction (p* = 0.80 at λ = 0.1, and lower for the minority class), see MODEL.md "Loss scales".
* Reduction: Eq. 14 sums over the batch; we default to the mean so the scale (and the effective
  learning rate) does not change with the batch size. ``reduction="sum"`` gives the paper's form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses.base import ImbalanceLoss, class_priors

__all__ = ["ACBFL", "acbfl_gammas", "acbfl_alpha", "inverse_frequency_weights"]

DEFAULT_GAMMA_BASE = 2.0
# Our choice (the paper gives no value): 0. With γ_c >= 2 the focal term's pull towards p = 1 is
# weak, so any confidence penalty caps the optimum of a correct prediction well below 1: with
# λ = 0.1, p* = 0.80 for the majority class and 0.66 / 0.59 for the minority at 95:5 / 99:1, and a
# toy problem lost 0.02-0.06 AUROC (MODEL.md "Loss scales"). The term stays available: λ > 0 is the
# confidence penalty −λH, λ < 0 the literal "+|λ|H" of Eq. 14 (preset ``paper_literal``).
DEFAULT_LAMBDA_SMOOTH = 0.0
# exp(-5) ~= 0.0067: at t = 0.5 the weights are ~92 % of the way to uniform (front-loaded curriculum).
DEFAULT_ALPHA_RATE = 5.0


def acbfl_gammas(priors: Sequence[float] | Tensor, gamma_base: float = DEFAULT_GAMMA_BASE) -> Tensor:
    """Class focusing parameters ``γ_c = γ_base · (π_maj / π_c)^{1/4}`` (float64, shape ``(C,)``).

    ``priors`` may be counts; only ratios matter. ``π_maj`` is the largest prior, so ``γ_maj = γ_base``.
    """
    pi = class_priors(priors)
    return float(gamma_base) * (pi.max() / pi) ** 0.25


def inverse_frequency_weights(priors: Sequence[float] | Tensor) -> Tensor:
    """Inverse-frequency class weights ``∝ 1/π_c``, normalised to mean 1 over classes (float64)."""
    inv = 1.0 / class_priors(priors)
    return inv * (inv.numel() / inv.sum())


def acbfl_alpha(priors: Sequence[float] | Tensor, t: float, rate: float = DEFAULT_ALPHA_RATE) -> Tensor:
    """Class weights ``α_c(t)`` of A-CBFL at training progress ``t ∈ [0, 1]`` (float64, mean 1).

    ``α(t) = 1 + (α_inv − 1) · s(t)`` with ``s(t) = (e^{−k t} − e^{−k}) / (1 − e^{−k})`` and ``k = rate``.
    ``s`` decays exponentially from exactly 1 at ``t = 0`` to exactly 0 at ``t = 1``, so the
    endpoints are exact: ``α(0) = α_inv`` (inverse frequency, mean 1) and ``α(1) = 1`` (uniform).
    Both endpoints have mean 1, hence so does every ``α(t)`` — no renormalisation needed.
    ``rate → 0`` tends to the linear interpolation; larger rates move to uniform sooner.
    """
    if rate < 0:
        raise ConfigError(f"alpha rate must be >= 0, got {rate}")
    t = min(max(float(t), 0.0), 1.0)
    if rate < 1e-8:
        s = 1.0 - t
    else:
        s = (math.exp(-rate * t) - math.exp(-rate)) / (1.0 - math.exp(-rate))
    return 1.0 + (inverse_frequency_weights(priors) - 1.0) * s


class ACBFL(ImbalanceLoss):
    """Adaptive Class-Balanced Focal Loss (Eq. 14) for ``C`` classes.

    Args:
        class_counts: training samples per class (or priors); defines π, γ_c and α_inv.
        gamma_base: γ of the majority class (paper: 2.0).
        class_gamma: if False, every class uses ``gamma_base`` (ablation "A-CBFL w/o class-dependent γ").
        dynamic_alpha: if False, α stays at the inverse-frequency weights for the whole run
            (ablation "A-CBFL w/o dynamic weighting": static class-balanced weights).
        alpha_rate: exponential rate ``k`` of the α schedule (see :func:`acbfl_alpha`).
        lambda_smooth: confidence-penalty weight; the loss **subtracts** ``λ·H(p)`` (module docstring).
        use_alpha: if False, α ≡ 1 (used to check the reduction to focal loss / cross-entropy).
        reduction: "mean" (default), "sum" (the paper's Σ_i) or "none".

    Call :meth:`set_progress` once per step (or epoch) with ``t ∈ [0, 1]``.
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    priors: torch.Tensor
    gammas: torch.Tensor

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor,
        gamma_base: float = DEFAULT_GAMMA_BASE,
        class_gamma: bool = True,
        dynamic_alpha: bool = True,
        alpha_rate: float = DEFAULT_ALPHA_RATE,
        lambda_smooth: float = DEFAULT_LAMBDA_SMOOTH,
        use_alpha: bool = True,
        reduction: str = "mean",
    ) -> None:
        pi = class_priors(class_counts)
        super().__init__(num_classes=pi.numel(), reduction=reduction)
        if gamma_base < 0:
            raise ConfigError(f"gamma_base must be >= 0, got {gamma_base}")
        if alpha_rate < 0:
            raise ConfigError(f"alpha_rate must be >= 0, got {alpha_rate}")
        self.gamma_base = float(gamma_base)
        self.class_gamma = bool(class_gamma)
        self.dynamic_alpha = bool(dynamic_alpha)
        self.use_alpha = bool(use_alpha)
        self.alpha_rate = float(alpha_rate)
        self.lambda_smooth = float(lambda_smooth)
        gam = acbfl_gammas(pi, gamma_base) if class_gamma else torch.full_like(pi, self.gamma_base)
        # Buffers (not parameters) so .to(device) moves them and state_dict records the setup.
        self.register_buffer("priors", pi.float(), persistent=False)
        self.register_buffer("gammas", gam.float(), persistent=False)

    def alpha(self, t: float | None = None) -> Tensor:
        """Class weights α(t) (float32, shape ``(C,)``) at progress ``t`` (default: :attr:`progress`)."""
        if not self.use_alpha:
            return torch.ones_like(self.priors)
        if not self.dynamic_alpha:
            return inverse_frequency_weights(self.priors.double()).to(self.priors)
        t = self.progress if t is None else t
        return acbfl_alpha(self.priors.double(), t, self.alpha_rate).to(self.priors)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample A-CBFL ``(B,)``; see the module docstring for the formula and signs."""
        log_p = F.log_softmax(logits, dim=1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        pt = log_pt.exp()
        gamma_t = self.gammas[target]
        # (1 - p)^γ via exp(γ·log1p(-p)) loses precision near p -> 1; clamp keeps the base >= 0 for
        # fractional γ (p can round to 1.0000001 in float32) and pow(0, γ>0) = 0 has a finite gradient.
        focal = (1.0 - pt).clamp_min(0.0).pow(gamma_t)
        loss = -self.alpha()[target] * focal * log_pt
        if self.lambda_smooth != 0.0:
            entropy = -(log_p.exp() * log_p).sum(dim=1)
            loss = loss - self.lambda_smooth * entropy
        return loss

    def extra_repr(self) -> str:
        g = ", ".join(f"{v:.4f}" for v in self.gammas.tolist())
        return (
            f"{super().extra_repr()}, gammas=[{g}], dynamic_alpha={self.dynamic_alpha}, "
            f"alpha_rate={self.alpha_rate}, lambda_smooth={self.lambda_smooth}"
        )
