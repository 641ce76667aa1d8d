"""Classification losses and the information-bottleneck training objective of CMAF-Net.

Registry::

    from wsi_cmaf.losses import create_loss, LOSSES
    loss = create_loss("acbfl", class_counts=[198738, 78786])
    loss.set_progress(epoch / n_epochs)
    value = loss(logits, target)

``LOSSES`` lists the canonical names (the paper's loss choices, Table 6); :data:`ALIASES` maps
short spellings ("ce", "cb", "a-cbfl", ...) to them. The full objective (task loss + β-weighted IB
terms from the model's aux dict) is :class:`~wsi_cmaf.losses.objective.IBObjective`.
"""

from __future__ import annotations

from wsi_cmaf.losses.acbfl import ACBFL, acbfl_alpha, acbfl_gammas, inverse_frequency_weights
from wsi_cmaf.losses.base import ImbalanceLoss, class_priors
from wsi_cmaf.losses.baselines import (
    BalancedSoftmax,
    ClassBalancedLoss,
    CrossEntropy,
    FocalLoss,
    LDAMLoss,
    effective_number_weights,
    ldam_margins,
)
from wsi_cmaf.losses.objective import (
    LOSS_PRESETS,
    IBObjective,
    LossConfig,
    ObjectiveOutput,
    beta_ramp,
    class_ib_weights,
)
from wsi_cmaf.losses.registry import ALIASES, LOSSES, canonical_loss_name, create_loss

__all__ = [
    "ACBFL",
    "ALIASES",
    "BalancedSoftmax",
    "ClassBalancedLoss",
    "CrossEntropy",
    "FocalLoss",
    "IBObjective",
    "ImbalanceLoss",
    "LDAMLoss",
    "LOSSES",
    "LOSS_PRESETS",
    "LossConfig",
    "ObjectiveOutput",
    "acbfl_alpha",
    "acbfl_gammas",
    "beta_ramp",
    "canonical_loss_name",
    "class_ib_weights",
    "class_priors",
    "create_loss",
    "effective_number_weights",
    "inverse_frequency_weights",
    "ldam_margins",
]
