"""Tiny deterministic patch classifiers for pipeline tests (importable by worker processes)."""

from __future__ import annotations

import time

import torch
from torch import nn

from wsi_cmaf.models import ModelConfig


class DarknessClassifier(nn.Module):
    """P(malignant) rises with how dark/purple a tile is: a real module with fixed weights.

    The synthetic tumour regions are denser and darker, so this model's heatmap has a
    known, testable relation to the ground-truth tumour mask.
    """

    def __init__(self, num_classes: int = 2, delay: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, num_classes)
        self.delay = delay
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            # inputs are ImageNet-normalised: darker tile -> lower mean -> higher logit for class 1
            self.fc.weight[-1] = torch.tensor([-3.0, -3.0, -1.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return self.fc(self.pool(x).flatten(1))


def tiny_config(**kw) -> ModelConfig:
    """Config for DarknessClassifier: 50 px tiles at 4 µm/px, 32 px input, no stain step."""
    base = dict(architecture="darkness", num_classes=2, class_names=["benign", "malignant"],
                input_size=32, stain_normalization=None, weights_note="test model (fixed weights)")
    base.update(kw)
    return ModelConfig(**base)
