"""Baseline imbalance losses compared against A-CBFL in the paper (Sec. 5, Tables 2-6).

* :class:`CrossEntropy` — softmax cross-entropy, plain or with class weights ``∝ π_c^{-1}``
  (``weighting="inverse"``) or ``∝ π_c^{-1/2}`` (``"sqrt_inverse"``), normalised so the
  prior-weighted mean weight is 1.
* :class:`FocalLoss` — Lin et al. (2017), softmax form ``−α_y (1 − p_y)^γ log p_y``.
* :class:`ClassBalancedLoss` — Cui et al. (2019): weights ``∝ (1 − β) / (1 − β^{n_c})`` (inverse
  effective number of samples), normalised to mean 1, on cross-entropy or focal loss.
* :class:`LDAMLoss` — Cao et al. (2019): subtract margin ``Δ_c ∝ n_c^{−1/4}`` (largest = ``max_margin``)
  from the true-class logit, then scaled cross-entropy.
* :class:`BalancedSoftmax` — Ren et al. (2020): cross-entropy on ``logits + log π``.

All are :class:`~wsi_cmaf.losses.base.ImbalanceLoss` modules (float32 maths, batch-mean by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses.base import ImbalanceLoss, class_priors

__all__ = [
    "CE_WEIGHTINGS",
    "CrossEntropy",
    "FocalLoss",
    "ClassBalancedLoss",
    "LDAMLoss",
    "BalancedSoftmax",
    "effective_number_weights",
    "ldam_margins",
    "prior_power_weights",
]


def _counts(class_counts: Sequence[float] | Tensor) -> Tensor:
    class_priors(class_counts)  # validation only
    return torch.as_tensor(class_counts, dtype=torch.float64).flatten()


CE_WEIGHTINGS = (None, "inverse", "sqrt_inverse")


def prior_power_weights(class_counts: Sequence[float] | Tensor, power: float) -> Tensor:
    """Class weights ``w_c ∝ π_c^{-power}`` scaled so that ``Σ_c π_c w_c = 1``.

    The normalisation keeps the expected per-sample loss on the training distribution at the
    unweighted scale, so learning rates tuned for plain cross-entropy still apply.
    """
    pi = class_priors(class_counts)
    w = pi.pow(-float(power))
    return w / (pi * w).sum()


class CrossEntropy(ImbalanceLoss):
    """Softmax cross-entropy ``−w_y log p_y``.

    ``weighting``: ``None`` (w ≡ 1; ``class_counts`` then only fixes the number of classes),
    ``"inverse"`` (w ∝ 1/π_c) or ``"sqrt_inverse"`` (w ∝ 1/√π_c), see :func:`prior_power_weights`.
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    weight: torch.Tensor

    def __init__(self, class_counts: Sequence[float] | Tensor, weighting: str | None = None,
                 reduction: str = "mean") -> None:
        if weighting not in CE_WEIGHTINGS:
            raise ConfigError(f"cross-entropy weighting must be one of {CE_WEIGHTINGS}, got {weighting!r}")
        super().__init__(num_classes=_counts(class_counts).numel(), reduction=reduction)
        self.weighting = weighting
        power = {None: 0.0, "inverse": 1.0, "sqrt_inverse": 0.5}[weighting]
        self.register_buffer("weight", prior_power_weights(class_counts, power).float(), persistent=False)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample ``−w_y log p_y``."""
        ce = F.cross_entropy(logits, target, reduction="none")
        return ce if self.weighting is None else self.weight[target] * ce


class FocalLoss(ImbalanceLoss):
    """Softmax focal loss ``−α_y (1 − p_y)^γ log p_y`` (Lin et al., 2017), γ shared by all classes.

    ``alpha``: optional per-class weights (length C); ``None`` means 1 for every class.
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    alpha: torch.Tensor

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor,
        gamma: float = 2.0,
        alpha: Sequence[float] | Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        n = _counts(class_counts).numel()
        super().__init__(num_classes=n, reduction=reduction)
        if gamma < 0:
            raise ConfigError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        a = torch.ones(n) if alpha is None else torch.as_tensor(alpha, dtype=torch.float32).flatten()
        if a.numel() != n or (a < 0).any():
            raise ConfigError(f"focal alpha must be {n} non-negative weights, got {a.tolist()}")
        self.register_buffer("alpha", a.float(), persistent=False)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample focal loss."""
        log_pt = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        focal = (1.0 - log_pt.exp()).clamp_min(0.0).pow(self.gamma)
        return -self.alpha[target] * focal * log_pt


def effective_number_weights(class_counts: Sequence[float] | Tensor, beta: float = 0.9999) -> Tensor:
    """Class-balanced weights of Cui et al.: ``w_c ∝ (1 − β) / (1 − β^{n_c})``, mean 1 (float64).

    ``(1 − β^n)/(1 − β)`` is the effective number of samples ``E_n``; β → 0 gives uniform weights,
    β → 1 tends to inverse frequency.
    """
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"class-balanced beta must be in [0, 1), got {beta}")
    n = _counts(class_counts)
    effective = (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)) / (1.0 - beta)
    w = 1.0 / effective
    return w * (w.numel() / w.sum())


class ClassBalancedLoss(ImbalanceLoss):
    """Class-balanced loss (Cui et al., 2019) on cross-entropy (``base="ce"``) or focal loss.

    Weights from :func:`effective_number_weights`; ``gamma`` is used only for ``base="focal"``.
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    weights: torch.Tensor

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor,
        beta: float = 0.9999,
        base: str = "ce",
        gamma: float = 2.0,
        reduction: str = "mean",
    ) -> None:
        n = _counts(class_counts).numel()
        super().__init__(num_classes=n, reduction=reduction)
        if base not in ("ce", "focal"):
            raise ConfigError(f"class-balanced base must be 'ce' or 'focal', got {base!r}")
        if gamma < 0:
            raise ConfigError(f"focal gamma must be >= 0, got {gamma}")
        self.beta, self.base, self.gamma = float(beta), base, float(gamma) if base == "focal" else 0.0
        self.register_buffer("weights", effective_number_weights(class_counts, beta).float(), persistent=False)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample class-balanced loss."""
        log_pt = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        focal = (1.0 - log_pt.exp()).clamp_min(0.0).pow(self.gamma) if self.gamma > 0 else 1.0
        return -self.weights[target] * focal * log_pt


def ldam_margins(class_counts: Sequence[float] | Tensor, max_margin: float = 0.5) -> Tensor:
    """LDAM margins ``Δ_c = K · n_c^{−1/4}`` with ``K`` set so the rarest class gets ``max_margin``."""
    if max_margin <= 0:
        raise ConfigError(f"LDAM max_margin must be > 0, got {max_margin}")
    m = _counts(class_counts) ** -0.25
    return m * (max_margin / m.max())


class LDAMLoss(ImbalanceLoss):
    """Label-distribution-aware margin loss (Cao et al., 2019).

    ``L = CE(s · (z − Δ_y e_y), y)``. Cao et al. use ``s = 30`` with a cosine (normalised) classifier
    whose logits lie in ``[−1, 1]``; CMAF-Net's head emits unnormalised logits, so the default here is
    ``scale = 1`` (margins then act in logit units). Pass ``scale=30`` with cosine logits.
    ``weight``: optional per-class weights (e.g. the deferred re-weighting stage of LDAM-DRW).
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    margins: torch.Tensor
    weight: torch.Tensor

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor,
        max_margin: float = 0.5,
        scale: float = 1.0,
        weight: Sequence[float] | Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        n = _counts(class_counts).numel()
        super().__init__(num_classes=n, reduction=reduction)
        if scale <= 0:
            raise ConfigError(f"LDAM scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.register_buffer("margins", ldam_margins(class_counts, max_margin).float(), persistent=False)
        w = torch.ones(n) if weight is None else torch.as_tensor(weight, dtype=torch.float32).flatten()
        if w.numel() != n:
            raise ConfigError(f"LDAM weight must have {n} entries, got {w.numel()}")
        self.register_buffer("weight", w.float(), persistent=False)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample LDAM loss."""
        shifted = logits - F.one_hot(target, self.num_classes).to(logits.dtype) * self.margins[target, None]
        ce = F.cross_entropy(self.scale * shifted, target, reduction="none")
        return self.weight[target] * ce


class BalancedSoftmax(ImbalanceLoss):
    """Balanced Softmax (Ren et al., 2020): ``CE(z + log π, y)`` — logit adjustment by the prior.

    At test time the raw logits ``z`` are used, which estimates the class-balanced posterior.
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    log_prior: torch.Tensor

    def __init__(self, class_counts: Sequence[float] | Tensor, reduction: str = "mean") -> None:
        pi = class_priors(class_counts)
        super().__init__(num_classes=pi.numel(), reduction=reduction)
        self.register_buffer("log_prior", pi.log().float(), persistent=False)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample balanced-softmax loss."""
        return F.cross_entropy(logits + self.log_prior, target, reduction="none")
