"""Imbalance protocol: resample the training split to a fixed majority:minority ratio.

The paper's sweep (80:20, 90:10, 95:5, 99:1) undersamples the minority (positive) class. Its
minority counts (49,685 / 22,082 / 10,460 / 2,006 against IDC's 198,738 benign patches) are
those of the WHOLE dataset, so the paper evidently resampled every split. This project resamples
the TRAINING split only, its own choice: validation and test keep their natural distribution, so
every ratio is evaluated on the same patients and patches (MODEL.md, "Deviations").

Counts are exact: with the ratio reduced to ``a:b`` (gcd 1) the result holds ``k*a``
majority and ``k*b`` minority rows for the largest ``k`` the data allows. When the data
cannot reach the ratio by dropping minority rows alone (already more imbalanced), the
majority is undersampled instead; either way the report says what was dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from math import gcd

import numpy as np
import pandas as pd

from wsi_cmaf.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PAPER_RATIOS = ("80:20", "90:10", "95:5", "99:1")


def parse_ratio(ratio: str) -> tuple[int, int]:
    """Parse ``"70:30"`` -> (70, 30); both parts positive integers."""
    try:
        a, b = (int(part) for part in str(ratio).split(":"))
    except ValueError as exc:
        raise ConfigError(f"ratio must look like '70:30', got {ratio!r}") from exc
    if a <= 0 or b <= 0:
        raise ConfigError(f"ratio parts must be positive, got {ratio!r}")
    return a, b


@dataclass
class ResampleReport:
    """What :func:`resample_to_ratio` did, in counts per label."""

    ratio: str
    majority_label: int
    minority_label: int
    before: dict[int, int]
    after: dict[int, int]
    dropped: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable form for run logs."""
        return {"ratio": self.ratio, "majority_label": self.majority_label,
                "minority_label": self.minority_label,
                "before": {str(k): v for k, v in self.before.items()},
                "after": {str(k): v for k, v in self.after.items()},
                "dropped": {str(k): v for k, v in self.dropped.items()}}

    def __str__(self) -> str:
        return (f"ratio {self.ratio}: label {self.majority_label} {self.before[self.majority_label]}"
                f" -> {self.after[self.majority_label]}, label {self.minority_label} "
                f"{self.before[self.minority_label]} -> {self.after[self.minority_label]}")


def target_counts(n_majority: int, n_minority: int, ratio: str) -> tuple[int, int]:
    """Largest (majority, minority) counts <= the available ones with EXACTLY the given ratio."""
    a, b = parse_ratio(ratio)
    g = gcd(a, b)
    a, b = a // g, b // g
    k = min(n_majority // a, n_minority // b)
    if k == 0:
        raise DataError(f"cannot reach ratio {ratio} with {n_majority} majority and {n_minority} minority rows")
    return k * a, k * b


def resample_to_ratio(
    frame: pd.DataFrame,
    ratio: str,
    *,
    seed: int = 0,
    minority_label: int = 1,
    majority_label: int = 0,
    split: str | None = "train",
    label_column: str = "label",
) -> tuple[pd.DataFrame, ResampleReport]:
    """Undersample the rows of ``split`` (all rows when None) to ``ratio`` = majority:minority.

    Rows of other splits and of other labels are kept untouched; the original row order is
    preserved. Deterministic for a given ``seed``.
    """
    if label_column not in frame.columns:
        raise ConfigError(f"frame has no column {label_column!r}")
    if split is not None:
        if "split" not in frame.columns:
            raise ConfigError("frame has no 'split' column; pass split=None to resample every row")
        in_scope = (frame["split"] == split).to_numpy()
    else:
        in_scope = np.ones(len(frame), dtype=bool)
    labels = frame[label_column].to_numpy()
    maj_idx = np.flatnonzero(in_scope & (labels == majority_label))
    min_idx = np.flatnonzero(in_scope & (labels == minority_label))
    n_maj, n_min = target_counts(len(maj_idx), len(min_idx), ratio)
    rng = np.random.default_rng(seed)
    keep_maj = rng.choice(maj_idx, size=n_maj, replace=False) if n_maj < len(maj_idx) else maj_idx
    keep_min = rng.choice(min_idx, size=n_min, replace=False) if n_min < len(min_idx) else min_idx
    drop = np.setdiff1d(np.concatenate([maj_idx, min_idx]), np.concatenate([keep_maj, keep_min]))
    mask = np.ones(len(frame), dtype=bool)
    mask[drop] = False
    out = frame[mask].reset_index(drop=True)
    report = ResampleReport(
        ratio=ratio, majority_label=majority_label, minority_label=minority_label,
        before={majority_label: len(maj_idx), minority_label: len(min_idx)},
        after={majority_label: n_maj, minority_label: n_min},
        dropped={majority_label: len(maj_idx) - n_maj, minority_label: len(min_idx) - n_min},
    )
    logger.info("imbalance resampling (%s split): %s", split or "all", report)
    return out, report


def imbalance_sweep(
    frame: pd.DataFrame, ratios: tuple[str, ...] = PAPER_RATIOS, *, seed: int = 0, **kwargs: object
) -> dict[str, tuple[pd.DataFrame, ResampleReport]]:
    """:func:`resample_to_ratio` for each ratio (same seed), keyed by ratio."""
    return {r: resample_to_ratio(frame, r, seed=seed, **kwargs) for r in ratios}  # type: ignore[arg-type]
