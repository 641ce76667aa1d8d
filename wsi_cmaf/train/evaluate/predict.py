"""Prediction over a loader and the metric reports of ``wsi-cmaf evaluate`` and the trainer.

Binary models get sensitivity, specificity, balanced accuracy, AUPRC, MCC, F1 with patient-level
bootstrap 95 % CIs; multi-class models macro/weighted F1, balanced accuracy, MCC and per-class
recall. With BreakHis metadata (``magnification``, ``subtype`` columns) the report adds one block
per magnification (zero-shot transfer, Table 3 style) and per-subtype detection rates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from wsi_cmaf.train.evaluate.metrics import (
    binary_metrics,
    bootstrap_binary_metrics,
    bootstrap_metric,
    multiclass_metrics,
    save_confusion_matrix,
)

logger = logging.getLogger(__name__)

Prepare = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, prepare: Prepare, device: torch.device,
            autocast_dtype: torch.dtype | None = None, *, name: str | None = None,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` over ``loader`` -> (probabilities (N, C), labels (N,), dataset indices (N,)).

    ``prepare(images, indices)`` turns a loader batch into model input (stain, resize, normalise).
    Any sample whose output is NaN/Inf raises :class:`~wsi_cmaf.errors.NonFiniteOutputError`
    naming the model (``name``, else its class): a metric over the remaining samples would not be
    the metric of the split, and NaN probabilities would otherwise surface as an unrelated error.
    """
    was = model.training
    model.eval()
    probs, labels, indices = [], [], []
    for batch in loader:
        x, y, idx = batch[0], batch[1], batch[2]
        inp = prepare(x.to(device), idx)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(inp)
        # checked on the device and carried as NaN rows: no extra sync (softmax maps -Inf to 0)
        finite = torch.isfinite(logits).all(dim=1, keepdim=True)
        probs.append(torch.where(finite, torch.softmax(logits.float(), dim=1), float("nan")).cpu())
        labels.append(torch.as_tensor(y))
        indices.append(torch.as_tensor(idx))
    model.train(was)
    out = torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy()
    _check_finite(out[0], out[2], name or type(model).__name__, autocast_dtype)
    return out


def _check_finite(probs: np.ndarray, indices: np.ndarray, name: str, autocast_dtype: torch.dtype | None) -> None:
    bad = ~np.isfinite(probs).all(axis=1)
    if not bad.any():
        return
    from wsi_cmaf.errors import NonFiniteOutputError

    hint = (f"evaluate it without mixed precision ({autocast_dtype} now; the --precision off of analyze)"
            if autocast_dtype is not None else "it fails in full precision: check the checkpoint "
            "(a diverged training run, a damaged file or export)")
    first = ", ".join(str(int(i)) for i in indices[bad][:5])
    raise NonFiniteOutputError(f"model {name!r} returned NaN/Inf for {int(bad.sum())} of {len(probs)} samples "
                               f"(dataset indices {first}{' ...' if bad.sum() > 5 else ''}); no metric is "
                               f"computed from them: {hint}")


def quick_metrics(probs: np.ndarray, labels: np.ndarray, positive_class: int = 1) -> dict[str, float]:
    """Point metrics for model selection (no bootstrap): binary metrics or multi-class ones."""
    if probs.shape[1] == 2:
        return binary_metrics((labels == positive_class).astype(int), probs[:, positive_class])
    m = multiclass_metrics(labels, probs.argmax(1), labels=range(probs.shape[1]))
    m.pop("per_class_recall")
    # AUPRC for selection: macro one-vs-rest average precision.
    from sklearn.metrics import average_precision_score

    present = [c for c in range(probs.shape[1]) if (labels == c).any()]
    m["auprc"] = float(np.mean([average_precision_score(labels == c, probs[:, c]) for c in present]))
    return m


def full_report(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    positive_class: int = 1,
    groups: Sequence | None = None,
    meta: pd.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    prefix: str = "test",
) -> dict[str, Any]:
    """Metrics with bootstrap CIs, a confusion-matrix PNG and BreakHis breakdowns, as a dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = probs.argmax(1)
    report: dict[str, Any] = {"n": int(len(labels)), "class_names": list(class_names)}
    if probs.shape[1] == 2:
        y = (labels == positive_class).astype(int)
        report["metrics"] = bootstrap_binary_metrics(y, probs[:, positive_class], n_boot=n_boot, seed=seed,
                                                     groups=groups)
    else:
        report["metrics"] = multiclass_metrics(labels, pred, labels=range(len(class_names)))
        for name, fn in (("macro_f1", _macro_f1), ("balanced_accuracy", _bacc)):
            report["metrics"][f"{name}_ci"] = bootstrap_metric(fn, labels, pred, n_boot=n_boot, seed=seed,
                                                               groups=groups)
    cm = save_confusion_matrix(labels, pred, out / f"{prefix}_confusion.png", class_names=class_names,
                               title=f"{prefix} (n={len(labels)})")
    report["figures"] = [str(cm)]
    if meta is not None and len(meta) == len(labels):
        report.update(breakdowns(probs, labels, meta, class_names, positive_class))
    return report


def _macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, p, average="macro", zero_division=0))


def _bacc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y, p))


def breakdowns(probs: np.ndarray, labels: np.ndarray, meta: pd.DataFrame, class_names: Sequence[str],
               positive_class: int = 1) -> dict[str, Any]:
    """Per-magnification metrics and per-subtype detection rates (BreakHis zero-shot)."""
    out: dict[str, Any] = {}
    meta = meta.reset_index(drop=True)
    if "magnification" in meta.columns and meta["magnification"].notna().any():
        per_mag = {}
        for mag, rows in meta.groupby("magnification").groups.items():
            idx = np.asarray(list(rows))
            if probs.shape[1] == 2:
                per_mag[str(mag)] = binary_metrics((labels[idx] == positive_class).astype(int),
                                                   probs[idx, positive_class])
            else:
                per_mag[str(mag)] = multiclass_metrics(labels[idx], probs[idx].argmax(1),
                                                       labels=range(probs.shape[1]))
        out["per_magnification"] = per_mag
    if "subtype" in meta.columns and meta["subtype"].notna().any() and probs.shape[1] == 2:
        # A binary model on BreakHis: the fraction of each subtype called malignant. For benign
        # subtypes lower is better (1 - specificity); for malignant ones it is the sensitivity.
        called = probs.argmax(1) == positive_class
        out["per_subtype_called_positive"] = {
            str(s): float(called[np.asarray(list(rows))].mean())
            for s, rows in meta.groupby("subtype").groups.items()
        }
    return out
