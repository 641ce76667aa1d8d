"""The settings and the data of the controlled imbalance experiment
(:mod:`wsi_cmaf.train.paper.controlled`): the arms, :class:`ControlledConfig` and :class:`Data`.

The experiment, its report (:mod:`~wsi_cmaf.train.paper.controlled_report`) and its stored
scores (:mod:`~wsi_cmaf.train.paper.controlled_scores`) all read these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.data.imbalance import parse_ratio

_NO_REGULARISERS = {"beta1": 0.0, "beta2": 0.0, "diversity_weight": 0.0, "entropy_weight": 0.0,
                    "orthogonality_weight": 0.0}
#: arm name -> (registry loss, loss kwargs, DFA readout on, other LossConfig fields)
ARMS: dict[str, tuple[str, dict[str, Any], bool, dict[str, Any]]] = {
    "ce": ("cross_entropy", {}, False, {}),
    "ce_sqrt": ("sqrt_weighted_cross_entropy", {}, False, {}),
    "ce_inverse": ("weighted_cross_entropy", {}, False, {}),
    "balanced_softmax": ("balanced_softmax", {}, False, {}),
    "focal": ("focal", {}, False, {}),
    "acbfl": ("acbfl", {}, False, {}),  # A-CBFL alone, λ = 0
    "acbfl_smooth": ("acbfl", {"lambda_smooth": 0.1}, False, {}),  # the −λH "label smoothing" reading
    "acbfl_dfa": ("acbfl", {}, True, {}),
    # the objective as shipped: A-CBFL times the Eq. 6 class weights (√ inverse frequency)
    "acbfl_shipped": ("acbfl", {}, False, {"class_weighted_ib": True}),
    # the mechanism: every class at γ_base, or α frozen at inverse frequency
    "acbfl_no_class_gamma": ("acbfl", {"class_gamma": False}, False, {}),
    "acbfl_no_dynamic": ("acbfl", {"dynamic_alpha": False}, False, {}),
    "acbfl_no_reg": ("acbfl", {}, False, dict(_NO_REGULARISERS)),  # the IB and attention terms off
}
REFERENCE_ARM = "ce_sqrt"
#: the tiny CMAF-Net of the synthetic sweeps (benchmarks/configs/sweep_synthetic.yaml)
TINY_CMAF: dict[str, Any] = {
    "spatial_backbone": "test_resnet", "mvit_stem_channels": 8, "mvit_channels": [8, 16, 24, 32, 32],
    "mvit_dims": [32, 32, 32], "mvit_depths": [1, 1, 1], "mvit_heads": 2, "context_dim": 64, "num_heads": 4,
    "bottleneck_dim": 16, "head_hidden": [32], "nystrom_landmarks": 16,
}


@dataclass
class ControlledConfig:
    """Every setting of the experiment (recorded in ``results.json``; a changed one restarts it)."""

    n_patients: int = 120
    patches_per_patient: int = 160
    generated_ratio: str = "80:20"
    signal: float = 0.5
    data_seed: int = 7
    split_patients: tuple[int, int, int] = (80, 20, 20)  # train / val / test
    n_minority: int = 100
    ratios: tuple[str, ...] = ("70:30", "95:5", "99:1")
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = tuple(range(10))
    input_size: int = 48
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(TINY_CMAF))
    stage1_epochs: int = 15
    stage1_lr: float = 1e-3
    # Fusion budget in passes over each ratio's training set (steps = ceil(passes × n / batch)), so
    # every ratio sees each sample equally often; ``steps`` (an int) fixes the step count instead,
    # as the first version of the experiment did (300 steps: 58 passes at 70:30, 1.9 at 99:1).
    passes: float = 20.0
    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    target_specificity: float = 0.95
    bootstrap: int = 500

    def validate(self) -> ControlledConfig:
        """Named errors for settings the design cannot honour."""
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ConfigError(f"unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
        if REFERENCE_ARM not in self.arms:
            raise ConfigError(f"the arms must include the reference {REFERENCE_ARM!r} (differences are against it)")
        if len(self.split_patients) != 3 or sum(self.split_patients) != self.n_patients:
            raise ConfigError(f"split_patients {self.split_patients} must be 3 counts summing to n_patients")
        if not self.seeds or not self.ratios:
            raise ConfigError("at least one seed and one ratio are needed")
        for r in self.ratios:
            parse_ratio(r)
        if self.steps is None and not self.passes > 0:
            raise ConfigError(f"passes must be > 0 (or set steps), got {self.passes}")
        return self

    def fusion_steps(self, n_train: int) -> int:
        """Optimiser steps of one fusion run on ``n_train`` samples (the budget rule above)."""
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.passes * n_train / min(self.batch_size, n_train)))

    def fingerprint(self) -> str:
        """Short hash of the settings (results of other settings are not reused)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Data:
    """All patches of the experiment and their patient split."""

    images: np.ndarray  # (N, P, P, 3) uint8
    labels: np.ndarray  # (N,) 0 benign, 1 malignant
    patients: np.ndarray  # (N,) patient id strings
    split: np.ndarray  # (N,) "train" | "val" | "test"
