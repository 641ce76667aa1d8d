"""The CMAF-Net training objective: task loss + information-bottleneck terms (Eq. 5, 6, 9).

.. math::

    L = \\frac{1}{B}\\sum_i w_{y_i}\\,\\ell(x_i, y_i)
        + r(s)\\big[\\beta_1\\,\\overline{(KL_s + KL_t)} + \\beta_2\\,\\hat I(Z_s;Z_t)
        + \\lambda_{div} R_{div} + \\lambda_{ent} R_{ent} + \\lambda_{orth} R_{orth}\\big]

* ``ℓ`` is the chosen classification loss (A-CBFL by default, :mod:`wsi_cmaf.losses.registry`).
  It is the variational relevance term: ``−E[log q(y|z)]`` bounds ``−I(Z;Y)`` (Eq. 3); A-CBFL is its
  margin-aware form (the ``L_margin`` of Eq. 9, which we do not add a second time).
* ``w_c`` are the class-weighted IB weights of Sec. 3.3 (Eq. 6), applied where Eq. 6 puts them — on
  the relevance term. Binary: ``w_1/w_0 = √(π_0/π_1)``. For ``C`` classes we generalise to
  ``w_c ∝ π_c^{−1/2}`` (every pairwise ratio is then ``√(π_a/π_b)``), normalised so ``Σ_c π_c w_c = 1``:
  the expected weight over the training distribution is 1, so the loss scale is unchanged.
  With A-CBFL this stacks with ``α_c(t)``; at the end of training ``α`` is uniform and the net
  class weighting is exactly the square-root weighting of Sec. 3.3.
* ``KL_s, KL_t`` are per-sample closed-form ``KL(q(z|x) ‖ N(0, I))`` (Eq. 4), averaged over the batch
  and, by default (``kl_normalization="per_dim"``), divided by the bottleneck width d: the summed KL
  is ~1.5·d nats at initialisation, which put β1·KL at 29× the task loss (MODEL.md "Loss scales").
  ``"sum"`` (preset ``paper_literal``) keeps Eq. 4's sum over dimensions.
* ``β_2 Î(Z_s;Z_t)`` is **added**: Eq. 5 writes ``−β_2 I(Z_s;Z_t)`` but states that the term
  "penalizes redundant information", which in a minimised loss needs a plus sign.
* ``r(s) ∈ [0, 1]`` is the β ramp (:func:`beta_ramp`): every IB regulariser grows from 0 to its target
  weight over ``ramp_steps`` optimiser steps (Sec. 4.5 "gradually increasing IB regularization
  weight"); ``fixed_beta=True`` is the Table 6 ablation "Fixed β (no scheduling)" (``r ≡ 1``).
* The model (``forward_with_aux``) provides ``kl_s, kl_t`` (B,), ``mi_st``, ``reg_diversity``,
  ``reg_entropy``, ``reg_orthogonality`` (scalars). A key that is absent (branch or block switched
  off) contributes nothing; a term switched off here is skipped even if present.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wsi_cmaf.config_dict import from_dict
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses.base import class_priors
from wsi_cmaf.losses.registry import canonical_loss_name, create_loss

logger = logging.getLogger(__name__)

__all__ = ["LossConfig", "LOSS_PRESETS", "IBObjective", "ObjectiveOutput", "beta_ramp", "class_ib_weights", "REG_TERMS"]

# aux key -> LossConfig field holding its weight, LossConfig switch. Order = logging order.
REG_TERMS: dict[str, tuple[str, str]] = {
    "kl": ("beta1", "use_kl"),
    "mi_st": ("beta2", "use_mi"),
    "reg_diversity": ("diversity_weight", "use_diversity"),
    "reg_entropy": ("entropy_weight", "use_entropy"),
    "reg_orthogonality": ("orthogonality_weight", "use_orthogonality"),
}
RAMP_SHAPES = ("linear", "cosine")
KL_NORMALIZATIONS = ("per_dim", "sum")
#: Named LossConfig settings (``LossConfig.preset``); "default" is the dataclass defaults.
LOSS_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The loss of the paper's recipe (training preset "paper", wsi_cmaf/train/presets.py, which
    # labels each value): the paper's A-CBFL, γ_base, β1, β2, Eq. 4's summed KL and Eq. 6's class
    # weights; where the paper is silent (λ, α rate, regulariser weights) the project's values. Both
    # sign corrections (β2 added, entropy term as −λH) are kept; with λ = 0 the second is moot.
    "paper": {"loss": "acbfl", "loss_kwargs": {"gamma_base": 2.0, "alpha_rate": 5.0, "lambda_smooth": 0.0},
              "beta1": 0.01, "beta2": 0.005, "kl_normalization": "sum", "class_weighted_ib": True,
              "diversity_weight": 0.5, "entropy_weight": 0.1, "orthogonality_weight": 0.5},
    # Kept for the measurements of MODEL.md "Loss scales"; NOT the paper: λ = 0.1 and the weights
    # 0.005 / 0.001 / 0.005 are this project's former guesses (the paper gives none), and it takes
    # Eq. 14's "+λH" sign literally (``lambda_smooth < 0``) while keeping the β2 correction.
    "paper_literal": {"kl_normalization": "sum", "loss_kwargs": {"lambda_smooth": -0.1},
                      "diversity_weight": 0.005, "entropy_weight": 0.001, "orthogonality_weight": 0.005},
}


def beta_ramp(step: int, ramp_steps: int, shape: str = "linear") -> float:
    """IB weight multiplier in [0, 1] at optimiser ``step``: 0 at step 0, 1 from ``ramp_steps`` on.

    ``shape="linear"``: ``step/ramp_steps``; ``"cosine"``: ``(1 − cos(π·step/ramp_steps))/2`` (zero slope
    at both ends). ``ramp_steps <= 0`` means no ramp (always 1).
    """
    if shape not in RAMP_SHAPES:
        raise ConfigError(f"beta ramp shape must be one of {RAMP_SHAPES}, got {shape!r}")
    if ramp_steps <= 0:
        return 1.0
    x = min(max(step / ramp_steps, 0.0), 1.0)
    return x if shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * x))


def class_ib_weights(class_counts: Sequence[float] | Tensor) -> Tensor:
    """Class-weighted IB weights ``w_c ∝ π_c^{−1/2}`` with ``Σ_c π_c w_c = 1`` (float64, shape ``(C,)``).

    For two classes ``w_1/w_0 = √(π_0/π_1)`` (Sec. 3.3); see the module docstring for ``C > 2``.
    """
    pi = class_priors(class_counts)
    w = pi.rsqrt()
    return w / (pi * w).sum()


@dataclass
class LossConfig:
    """Every switch of the training objective (paper defaults; Table 6 ablations in comments).

    Weights of the diversity / entropy / orthogonality regularisers are not given in the paper;
    ours put each one's gradient at ~5 % of the task's at initialisation (MODEL.md "Loss scales").
    ``LossConfig.preset("paper")`` is the loss of the paper's recipe (summed KL).
    ``ramp_steps`` is for library use: the trainer sets it per stage and training configs refuse it.
    """

    loss: str = "acbfl"  # "cross_entropy", "focal", "class_balanced", "ldam", "balanced_softmax", ...
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # forwarded to create_loss
    beta1: float = 0.01  # compression I(Z_s;X) + I(Z_t;X) (Eq. 5); the paper's value
    beta2: float = 0.005  # redundancy I(Z_s;Z_t); 0 = "w/o IB regularization (β2 = 0)"; the paper's value
    # The paper gives no weights for these three. Chosen so that each one's gradient on the CMAF
    # block is ~5 % of the task loss's at initialisation (benchmarks/measure_loss_scales.py:
    # 4.8 %, 3.9 %, 5.2 %); at the former 0.005 / 0.001 / 0.005 they were 0.04-0.05 % and the
    # Table 6 rows that remove them changed nothing (MODEL.md "Loss scales").
    diversity_weight: float = 0.5
    entropy_weight: float = 0.1
    orthogonality_weight: float = 0.5
    # "per_dim": each branch's KL is divided by its bottleneck width d (MODEL.md "Loss scales": the
    # summed KL makes β1·KL 29x the task loss at init); "sum": Eq. 4 as written (paper_literal).
    kl_normalization: str = "per_dim"
    use_kl: bool = True
    use_mi: bool = True
    use_diversity: bool = True  # False = "w/o Diversity loss"
    use_entropy: bool = True  # False = "w/o Entropy regularization"
    use_orthogonality: bool = True
    ramp_steps: int = 2000  # optimiser steps to reach the target β's
    ramp_shape: str = "linear"
    fixed_beta: bool = False  # True = "Fixed β (no scheduling)"
    class_weighted_ib: bool = True  # w_c on the relevance term (Sec. 3.3)

    def validate(self) -> LossConfig:
        """Raise :class:`ConfigError` on impossible values; return ``self`` for chaining."""
        canonical_loss_name(self.loss)
        for name, _ in REG_TERMS.values():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"LossConfig.{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.ramp_steps, int) or self.ramp_steps < 0:
            raise ConfigError(f"LossConfig.ramp_steps must be an int >= 0, got {self.ramp_steps!r}")
        if self.ramp_shape not in RAMP_SHAPES:
            raise ConfigError(f"LossConfig.ramp_shape must be one of {RAMP_SHAPES}, got {self.ramp_shape!r}")
        if not isinstance(self.loss_kwargs, dict):
            raise ConfigError("LossConfig.loss_kwargs must be a dict")
        if self.kl_normalization not in KL_NORMALIZATIONS:
            raise ConfigError(f"LossConfig.kl_normalization must be one of {KL_NORMALIZATIONS}, "
                              f"got {self.kl_normalization!r}")
        return self

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LossConfig:
        """A named configuration (:data:`LOSS_PRESETS`) with ``overrides`` applied on top.

        ``"default"`` is the project's measured choice; ``"paper"`` the loss of the paper's recipe
        (the training preset ``paper`` labels which values are the paper's); ``"paper_literal"``
        the former literal reading (summed KL, Eq. 14's ``+λH`` with the project's λ = 0.1), kept
        for the loss-scale measurements.
        """
        if name not in LOSS_PRESETS:
            raise ConfigError(f"unknown loss preset {name!r}; choose one of {sorted(LOSS_PRESETS)}")
        return cls.from_dict({**LOSS_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossConfig:
        """Build from a dict (e.g. parsed JSON); unknown keys are a :class:`ConfigError`."""
        data = dict(data)
        if "preset" in data:  # {"preset": "paper_literal", ...}: the preset, then the other keys
            name = data.pop("preset")
            return cls.preset(str(name), **data)
        return from_dict(cls, data, where=cls.__name__).validate()


@dataclass
class ObjectiveOutput:
    """Result of :class:`IBObjective`: ``total`` (differentiable scalar) and a logging breakdown.

    ``terms`` holds *detached* tensors (no GPU sync until you read them): the weighted contribution of
    each part (``task`` and each key of :data:`REG_TERMS` present) — these sum to ``total`` — plus the
    unweighted values as ``raw/<name>`` and the current ramp factor ``beta_scale``.
    """

    total: Tensor
    terms: dict[str, Tensor]

    def as_floats(self) -> dict[str, float]:
        """The breakdown (and ``total``) as Python floats, for loggers."""
        out = {k: float(v) for k, v in self.terms.items()}
        out["total"] = float(self.total.detach())
        return out


class IBObjective(nn.Module):
    """Task loss plus the β-weighted information-bottleneck terms of the model's aux dict.

    Call ``objective.update(step, total_steps)`` once per optimiser step (sets the β ramp step and
    the task loss's training progress ``t = step / total_steps``), then
    ``out = objective(logits, target, aux)`` and ``out.total.backward()``.
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    ib_weights: torch.Tensor

    def __init__(self, config: LossConfig, class_counts: Sequence[float] | Tensor) -> None:
        super().__init__()
        self.config = config.validate()
        self.task_loss = create_loss(config.loss, class_counts, **{**config.loss_kwargs, "reduction": "none"})
        self.register_buffer("ib_weights", class_ib_weights(class_counts).float(), persistent=False)
        self.step = 0
        self._warned_missing: set[str] = set()

    def update(self, step: int, total_steps: int | None = None) -> None:
        """Set the optimiser step (β ramp) and, if ``total_steps`` is given, the progress ``step/total``."""
        self.step = int(step)
        if total_steps is not None:
            if total_steps <= 0:
                raise ConfigError(f"total_steps must be > 0, got {total_steps}")
            self.task_loss.set_progress(step / total_steps)

    def set_progress(self, t: float) -> None:
        """Set the task loss's training progress ``t ∈ [0, 1]`` (A-CBFL α schedule)."""
        self.task_loss.set_progress(t)

    def beta_scale(self, step: int | None = None) -> float:
        """Ramp factor ``r`` in [0, 1] applied to every IB weight (1 when ``fixed_beta``)."""
        if self.config.fixed_beta:
            return 1.0
        return beta_ramp(self.step if step is None else step, self.config.ramp_steps, self.config.ramp_shape)

    def _kl(self, aux: Mapping[str, Tensor], branch: str) -> Tensor:
        """Batch mean of branch ``branch``'s KL, divided by its bottleneck width when ``per_dim``."""
        kl = aux[f"kl_{branch}"].float().mean()
        if self.config.kl_normalization == "sum":
            return kl
        mu = aux.get(f"mu_{branch}")
        if mu is None:  # the width is needed; guessing it would silently rescale β1
            raise ConfigError(f"kl_normalization 'per_dim' needs aux['mu_{branch}'] to know the bottleneck "
                              "width; pass it or use kl_normalization: sum")
        return kl / mu.shape[-1]

    def _aux_terms(self, aux: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Raw (unweighted) scalar value of each enabled regulariser that the aux dict provides."""
        found: dict[str, Tensor] = {}
        kls = [self._kl(aux, branch) for branch in ("s", "t") if f"kl_{branch}" in aux]
        for name, (_weight, switch) in REG_TERMS.items():
            if not getattr(self.config, switch):
                continue
            if name == "kl":
                value = torch.stack(kls).sum() if kls else None
            else:
                value = aux[name].float().mean() if name in aux else None
            if value is None:
                if name not in self._warned_missing:  # once: an ablated branch legitimately lacks it
                    logger.debug("objective: aux has no %r; term skipped", name)
                    self._warned_missing.add(name)
                continue
            found[name] = value
        return found

    def forward(
        self, logits: Tensor, target: Tensor, aux: Mapping[str, Tensor] | None = None, step: int | None = None
    ) -> ObjectiveOutput:
        """Total loss for a batch: ``logits`` (B, C), ``target`` (B,), ``aux`` from ``forward_with_aux``."""
        per_sample = self.task_loss(logits, target)
        if self.config.class_weighted_ib:
            per_sample = per_sample * self.ib_weights.to(per_sample.device)[target]
        task = per_sample.mean()
        scale = self.beta_scale(step)
        total = task
        terms: dict[str, Tensor] = {"task": task.detach()}
        for name, raw in self._aux_terms(aux or {}).items():
            weight = getattr(self.config, REG_TERMS[name][0]) * scale
            if weight == 0.0:  # skip, so a NaN in a switched-off/ramped-out term cannot leak into total
                terms[name] = torch.zeros((), device=raw.device)
            else:
                contribution = weight * raw
                total = total + contribution
                terms[name] = contribution.detach()
            terms[f"raw/{name}"] = raw.detach()
        terms["beta_scale"] = torch.tensor(scale)
        return ObjectiveOutput(total=total, terms=terms)

    def extra_repr(self) -> str:
        return f"config={self.config}"
