"""Do the maps point at the evidence? Pointing-game scores against a random-map baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsi_cmaf.explain.common import ExplainError


@dataclass(frozen=True)
class PointingScore:
    """``mass``: mean fraction of |saliency| inside the region; ``hit``: fraction of tiles whose
    argmax lies inside it; ``area``: mean region fraction (the expected score of a random map)."""

    mass: float
    hit: float
    area: float


def pointing_score(maps: np.ndarray, masks: np.ndarray) -> PointingScore:
    """Score (B, H, W) saliency maps against boolean (B, H, W) evidence masks (|map| is used)."""
    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ExplainError(f"maps {maps.shape} and masks {masks.shape} must both be (B, H, W)")
    if not masks.any(axis=(1, 2)).all():
        raise ExplainError("every mask needs at least one pixel inside the region")
    sal = np.abs(maps)
    total = sal.sum(axis=(1, 2))
    # A constant-zero map carries no evidence; score it as random (area) rather than divide by 0.
    area = masks.mean(axis=(1, 2))
    inside = np.where(total > 0, (sal * masks).sum(axis=(1, 2)) / np.maximum(total, 1e-30), area)
    flat = sal.reshape(len(sal), -1)
    hits = masks.reshape(len(masks), -1)[np.arange(len(flat)), flat.argmax(axis=1)]
    return PointingScore(float(inside.mean()), float(hits.mean()), float(area.mean()))


def random_baseline(masks: np.ndarray, n_draws: int = 20, seed: int = 0) -> PointingScore:
    """The pointing score of uniform-noise maps (mean over draws)."""
    rng = np.random.default_rng(seed)
    scores = [pointing_score(rng.random(masks.shape), masks) for _ in range(n_draws)]
    return PointingScore(*(float(np.mean([getattr(s, f) for s in scores])) for f in ("mass", "hit", "area")))
