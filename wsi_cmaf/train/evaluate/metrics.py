"""Evaluation metrics (scikit-learn), bootstrap confidence intervals and confusion-matrix figures.

Point estimates come straight from scikit-learn. The bootstrap recomputes the
count-based metrics (sensitivity, specificity, balanced accuracy, MCC, F1...) from
resampled confusion matrices in one vectorised step, because 1,000 resamples x several
sklearn calls would take tens of seconds on large test sets; ``test_metrics`` checks that
those formulas equal scikit-learn's. AUPRC/AUROC are recomputed with scikit-learn per
resample. With ``groups`` (patient ids) the bootstrap resamples patients, not patches,
since patches of one patient are correlated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from wsi_cmaf.errors import DataError

logger = logging.getLogger(__name__)

BINARY_COUNT_METRICS = ("sensitivity", "specificity", "balanced_accuracy", "precision", "f1", "mcc", "accuracy")


def _check(y_true: np.ndarray, other: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    y_true, other = np.asarray(y_true), np.asarray(other)
    if len(y_true) == 0:
        raise DataError("cannot compute metrics on zero samples")
    if len(y_true) != len(other):
        raise DataError(f"y_true has {len(y_true)} samples but {name} has {len(other)}")
    return y_true, other


def binary_metrics(y_true: ArrayLike, y_score: ArrayLike, *, threshold: float = 0.5) -> dict[str, float]:
    """Binary metrics for positive class 1; ``y_score`` = P(positive) (thresholded at ``threshold``).

    Returns sensitivity, specificity, balanced_accuracy, precision, f1, mcc, accuracy,
    auprc (average precision), auroc (NaN when only one class is present) and tp/fp/tn/fn.
    """
    y, s = _check(np.asarray(y_true).astype(int), np.asarray(y_score, dtype=float), "y_score")
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both = len(np.unique(y)) == 2
    return {
        "sensitivity": float(skm.recall_score(y, pred, pos_label=1, zero_division=0)),
        "specificity": float(skm.recall_score(y, pred, pos_label=0, zero_division=0)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if both else float("nan"),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "mcc": float(skm.matthews_corrcoef(y, pred)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "auprc": float(skm.average_precision_score(y, s)) if y.any() else float("nan"),
        "auroc": float(skm.roc_auc_score(y, s)) if both else float("nan"),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
        "n": int(len(y)), "threshold": float(threshold),
    }


def multiclass_metrics(y_true: ArrayLike, y_pred: ArrayLike, *, labels: Sequence[int]) -> dict:
    """Macro/weighted F1, balanced accuracy, MCC, accuracy and per-class recall (keyed by label)."""
    y, p = _check(np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int), "y_pred")
    labels = list(labels)
    recall = skm.recall_score(y, p, labels=labels, average=None, zero_division=0)
    return {
        "macro_f1": float(skm.f1_score(y, p, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y, p, labels=labels, average="weighted", zero_division=0)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, p)),
        "mcc": float(skm.matthews_corrcoef(y, p)),
        "accuracy": float(skm.accuracy_score(y, p)),
        "per_class_recall": {int(c): float(r) for c, r in zip(labels, recall)},
        "n": int(len(y)),
    }


def _binary_from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised count formulas (same conventions as sklearn: 0 where undefined)."""
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        spec = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
        prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(denom > 0, (tp * tn - fp * fn) / denom, 0.0)
    n = tp + fp + tn + fn
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2,
            "precision": prec, "f1": f1, "mcc": mcc, "accuracy": (tp + tn) / n}


def bootstrap_indices(n: int, n_boot: int, seed: int, groups: ArrayLike | None = None) -> list[np.ndarray]:
    """Seeded bootstrap resamples of ``range(n)``; with ``groups``, whole groups are resampled."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return list(rng.integers(0, n, size=(n_boot, n)))
    group_of = np.asarray(groups)
    if len(group_of) != n:
        raise DataError(f"groups has {len(group_of)} entries for {n} samples")
    _, codes = np.unique(group_of, return_inverse=True)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    picks = rng.integers(0, len(members), size=(n_boot, len(members)))
    return [np.concatenate([members[g] for g in row]) for row in picks]


def _ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_binary_metrics(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: ArrayLike | None = None,
) -> dict[str, dict[str, float]]:
    """Point estimate and percentile bootstrap CI per metric: ``{name: {value, ci_low, ci_high}}``."""
    y, s = _check(np.asarray(y_true).astype(int), np.asarray(y_score, dtype=float), "y_score")
    point = binary_metrics(y, s, threshold=threshold)
    pred = (s >= threshold).astype(int)
    idx = bootstrap_indices(len(y), n_boot, seed, groups)
    cells = np.stack([np.bincount(2 * y[i] + pred[i], minlength=4) for i in idx])  # tn, fp, fn, tp
    counts = _binary_from_counts(cells[:, 3], cells[:, 1], cells[:, 0], cells[:, 2])
    both = np.array([0 < y[i].sum() < len(i) for i in idx])
    # A resample with one class has no defined AUPRC/AUROC/balanced accuracy: leave it out.
    counts["balanced_accuracy"] = np.where(both, counts["balanced_accuracy"], np.nan)
    counts["auprc"] = np.array([skm.average_precision_score(y[i], s[i]) if b else np.nan for i, b in zip(idx, both)])
    counts["auroc"] = np.array([skm.roc_auc_score(y[i], s[i]) if b else np.nan for i, b in zip(idx, both)])
    out = {}
    for name, values in counts.items():
        lo, hi = _ci(values, alpha)
        out[name] = {"value": point[name], "ci_low": lo, "ci_high": hi}
    return out


def bootstrap_metric(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y_true: ArrayLike,
    y_other: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: ArrayLike | None = None,
) -> dict[str, float]:
    """Bootstrap CI of any ``metric(y_true, y_other)`` (e.g. multi-class macro F1)."""
    y, o = _check(np.asarray(y_true), np.asarray(y_other), "y_other")
    values = np.array([metric(y[i], o[i]) for i in bootstrap_indices(len(y), n_boot, seed, groups)], float)
    lo, hi = _ci(values, alpha)
    return {"value": float(metric(y, o)), "ci_low": lo, "ci_high": hi}


def save_confusion_matrix(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    path: str | Path,
    *,
    class_names: Sequence[str],
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Write a confusion-matrix PNG (rows: true class; cells show row-% and counts)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(range(len(class_names)))
    cm = skm.confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    k = len(labels)
    # Figure + Agg canvas (no pyplot): no global state, safe in threads and headless runs.
    fig = Figure(figsize=(1.2 + 0.9 * k, 1.0 + 0.8 * k), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac if normalize else cm, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for i in range(k):
        for j in range(k):
            text = f"{100 * frac[i, j]:.1f}%\n({cm[i, j]})" if normalize else str(cm[i, j])
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(labels, labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(labels, labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def mcnemar_test(y_true: ArrayLike, pred_a: ArrayLike, pred_b: ArrayLike) -> dict[str, float | int]:
    """Exact (binomial) McNemar test of two classifiers' correctness on the same samples.

    Only the discordant pairs carry information: ``b`` = samples A gets right and B wrong, ``c`` =
    the reverse. Under H0 (equal error rates) ``b ~ Binomial(b + c, 1/2)``; the p-value is the
    two-sided exact binomial one (``scipy.stats.binomtest``), which stays valid for the few
    discordant pairs a small test set gives, where the chi-square form does not. With no
    discordant pair the models cannot be told apart: p = 1.
    """
    from scipy.stats import binomtest

    y, a = _check(np.asarray(y_true), np.asarray(pred_a), "pred_a")
    _, b_pred = _check(y, np.asarray(pred_b), "pred_b")
    right_a, right_b = a == y, b_pred == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"n": int(len(y)), "a_only_correct": b, "b_only_correct": c,
            "both_correct": int(np.sum(right_a & right_b)), "both_wrong": int(np.sum(~right_a & ~right_b)),
            "accuracy_a": float(right_a.mean()), "accuracy_b": float(right_b.mean()), "p_value": p}


def threshold_at_specificity(y_true: ArrayLike, y_score: ArrayLike, specificity: float) -> float:
    """Smallest threshold ``t`` whose rule "positive iff score > t" keeps ``specificity`` on the negatives.

    ``t`` is the ⌈specificity·n_neg⌉-th smallest negative score, so at least that share of the
    negatives scores ≤ t. Choose it on validation data and apply it unchanged to the test set.
    """
    y, s = _check(np.asarray(y_true).astype(int), np.asarray(y_score, dtype=float), "y_score")
    if not 0.0 < specificity <= 1.0:
        raise DataError(f"specificity must be in (0, 1], got {specificity}")
    neg = np.sort(s[y == 0])
    if neg.size == 0:
        raise DataError("no negatives to choose a threshold at a specificity from")
    k = int(np.ceil(specificity * neg.size - 1e-12))
    return float(neg[max(k, 1) - 1])


def expected_calibration_error(y_true: ArrayLike, y_score: ArrayLike, bins: int = 15) -> float:
    """Binary ECE: Σ_b (n_b / N)·|mean(y) − mean(score)| over ``bins`` equal-width bins of P(positive)."""
    y, s = _check(np.asarray(y_true).astype(float), np.asarray(y_score, dtype=float), "y_score")
    which = np.minimum((s * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(y[inside].mean() - s[inside].mean())
    return float(total)


def rank_auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """AUROC by the Mann–Whitney rank sum (ties get mid-ranks): the same value as scikit-learn's
    ``roc_auc_score``, several times faster, for bootstrap loops. NaN with one class only."""
    from scipy.stats import rankdata

    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(y_score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
