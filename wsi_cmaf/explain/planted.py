"""Synthetic tiles with a planted 'malignant' texture in a known region, for sanity checks.

Every tile is smooth, low-frequency 'tissue' noise. Malignant tiles (label 1) carry a fine
checkerboard-like texture in one square region at a random position; benign tiles get the same
square filled with more smooth noise. Both textures have zero mean and the same per-pixel
contrast, so brightness or |input| does not give the region away: only the texture does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PlantedTiles:
    """``x`` (N, 3, S, S) float32 (zero mean, ~unit std), ``y`` (N,) int64, ``mask`` (N, S, S) bool."""

    x: torch.Tensor
    y: torch.Tensor
    mask: np.ndarray


def _smooth(gen: torch.Generator, n: int, size: int, cells: int) -> torch.Tensor:
    coarse = torch.randn(n, 3, cells, cells, generator=gen)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return field / field.std(dim=(1, 2, 3), keepdim=True)


def planted_tiles(n: int, size: int = 64, region: int = 24, seed: int = 0, period: int = 4) -> PlantedTiles:
    """``n`` tiles, half malignant, each with its region at a random position (the mask)."""
    gen = torch.Generator().manual_seed(seed)
    x = _smooth(gen, n, size, max(size // 8, 2))
    y = torch.arange(n) % 2
    y = y[torch.randperm(n, generator=gen)]
    yy, xx = torch.meshgrid(torch.arange(region), torch.arange(region), indexing="ij")
    mask = np.zeros((n, size, size), dtype=bool)
    fill = _smooth(gen, n, region, max(region // 8, 2))
    for i in range(n):
        r0, c0 = (int(v) for v in torch.randint(0, size - region + 1, (2,), generator=gen))
        if y[i] == 1:
            phase = torch.randint(0, period, (2,), generator=gen)
            # A checkerboard of `period`-px cells: high spatial frequency, zero mean, unit contrast.
            checker = ((((yy + phase[0]) // (period // 2)) + ((xx + phase[1]) // (period // 2))) % 2) * 2.0 - 1.0
            patch = checker.expand(3, region, region) * (0.8 + 0.4 * torch.rand(3, 1, 1, generator=gen))
        else:
            patch = fill[i]
        x[i, :, r0:r0 + region, c0:c0 + region] = patch
        mask[i, r0:r0 + region, c0:c0 + region] = True
    return PlantedTiles(x.float(), y.long(), mask)


def train_quick(model: nn.Module, data: PlantedTiles, steps: int = 150, batch: int = 32, lr: float = 3e-3,
                shuffle_labels: bool = False, seed: int = 0) -> float:
    """Train with AdamW for ``steps`` minibatches; returns the final training accuracy.

    ``shuffle_labels`` permutes the labels once (Adebayo et al. 2018's data-randomisation test).
    """
    gen = torch.Generator().manual_seed(seed)
    y = data.y[torch.randperm(len(data.y), generator=gen)] if shuffle_labels else data.y
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = F.cross_entropy(model(data.x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(data.x).argmax(1) == y).float().mean())
