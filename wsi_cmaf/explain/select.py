"""Which tiles of a slide to explain: the most malignant ones and the ones the model hesitates on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsi_cmaf.errors import UsageError
from wsi_cmaf.explain.common import ExplainError

TOP_K = "top_k"
NEAR_THRESHOLD = "near_threshold"


@dataclass(frozen=True)
class TileChoice:
    """Chosen tiles in gallery order: the top-k first (most malignant first), then the
    near-threshold ones (closest first). ``rows``/``cols`` index the store's tile grid."""

    rows: np.ndarray
    cols: np.ndarray
    probability: np.ndarray
    reason: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.rows.size)


def choose_tiles(prob: np.ndarray, tissue: np.ndarray, k: int, threshold: float) -> TileChoice:
    """The ``k`` tissue tiles of highest ``prob`` plus the ``k`` other tissue tiles whose ``prob``
    lies closest to ``threshold``.

    ``prob``: (rows, cols) probability of the positive class, NaN = not computed (those tiles
    are never chosen). Ties go to the tile that comes first in row-major order, so the choice
    is reproducible. Fewer tiles come back when the slide has fewer than ``2 k`` candidates.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise UsageError(f"top-k must be a positive whole number of tiles, got {k!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise UsageError(f"decision threshold must be in [0, 1], got {threshold}")
    prob = np.asarray(prob, dtype=np.float64)
    tissue = np.asarray(tissue, dtype=bool)
    if prob.shape != tissue.shape or prob.ndim != 2:
        raise ExplainError(f"probabilities {prob.shape} and tissue mask {tissue.shape} must be one (rows, cols) grid")
    flat = np.flatnonzero(tissue.ravel() & np.isfinite(prob.ravel()))  # row-major tile numbers
    if flat.size == 0:
        raise ExplainError("the store has no tissue tile with a probability: nothing to explain")
    p = prob.ravel()[flat]
    # lexsort sorts by its last key first; the tile number breaks ties
    top = flat[np.lexsort((flat, -p))][:k]
    rest = np.setdiff1d(flat, top, assume_unique=True)
    near = rest[np.lexsort((rest, np.abs(prob.ravel()[rest] - threshold)))][:k]
    chosen = np.concatenate([top, near])
    rows, cols = np.divmod(chosen, prob.shape[1])
    reasons = (TOP_K,) * top.size + (NEAR_THRESHOLD,) * near.size
    return TileChoice(rows.astype(np.int64), cols.astype(np.int64), prob.ravel()[chosen], reasons)
