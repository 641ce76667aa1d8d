"""Metrics against hand-computed values and scikit-learn; bootstrap CIs; confusion-matrix PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from wsi_cmaf.errors import DataError
from wsi_cmaf.train.evaluate.metrics import (
    _binary_from_counts,
    binary_metrics,
    bootstrap_binary_metrics,
    bootstrap_indices,
    bootstrap_metric,
    multiclass_metrics,
    save_confusion_matrix,
)


def test_binary_metrics_hand_example():
    # tp=3 fn=2 (positives), tn=4 fp=1 (negatives)
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.6, 0.4, 0.3, 0.2, 0.1])
    m = binary_metrics(y, s)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 2, 4, 1)
    assert m["sensitivity"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert m["mcc"] == pytest.approx((3 * 4 - 1 * 2) / np.sqrt(4 * 5 * 5 * 6))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, s))
    assert binary_metrics(y, s, threshold=0.15)["sensitivity"] == pytest.approx(4 / 5)


def test_count_formulas_equal_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        p = rng.integers(0, 2, 60)
        tn, fp, fn, tp = skm.confusion_matrix(y, p, labels=[0, 1]).ravel()
        c = _binary_from_counts(tp, fp, tn, fn)
        assert c["sensitivity"] == pytest.approx(skm.recall_score(y, p, zero_division=0))
        assert c["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
        assert c["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p))
        assert c["f1"] == pytest.approx(skm.f1_score(y, p, zero_division=0))
        assert c["precision"] == pytest.approx(skm.precision_score(y, p, zero_division=0))


def test_multiclass_hand_example():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    m = multiclass_metrics(y, p, labels=[0, 1, 2, 3])
    assert m["per_class_recall"] == {0: 0.5, 1: 1.0, 2: 0.5, 3: 0.0}
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["macro_f1"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3, 0.0]))
    assert m["accuracy"] == pytest.approx(4 / 6)


def _noisy(n, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, np.clip(0.35 * y + rng.normal(0.35, 0.2, n), 0, 1)


def test_bootstrap_ci_contains_point_is_seeded_and_shrinks_with_n():
    y, s = _noisy(400, 1)
    a = bootstrap_binary_metrics(y, s, n_boot=300, seed=3)
    b = bootstrap_binary_metrics(y, s, n_boot=300, seed=3)
    assert a == b
    for name, v in a.items():
        assert v["ci_low"] <= v["value"] <= v["ci_high"], name
    assert a["auprc"]["value"] == pytest.approx(binary_metrics(y, s)["auprc"])
    y2, s2 = _noisy(4000, 1)
    big = bootstrap_binary_metrics(y2, s2, n_boot=300, seed=3)
    width = lambda m, k: m[k]["ci_high"] - m[k]["ci_low"]  # noqa: E731
    for k in ("sensitivity", "mcc", "auprc"):
        assert width(big, k) < 0.6 * width(a, k), k


def test_grouped_bootstrap_resamples_whole_patients_and_is_wider_for_clustered_data():
    groups = np.repeat(np.arange(20), 10)
    for idx in bootstrap_indices(200, 5, seed=0, groups=groups):
        counts = np.bincount(groups[idx], minlength=20)
        assert np.all(counts % 10 == 0)
    rng = np.random.default_rng(0)
    # every patient has its own bias: patches are strongly correlated within a patient
    y = rng.integers(0, 2, 200)
    bias = rng.normal(0, 0.3, 20)[groups]
    s = np.clip(0.5 + 0.2 * (y - 0.5) + bias, 0, 1)
    plain = bootstrap_binary_metrics(y, s, n_boot=300, seed=0)["sensitivity"]
    grouped = bootstrap_binary_metrics(y, s, n_boot=300, seed=0, groups=groups)["sensitivity"]
    assert grouped["ci_high"] - grouped["ci_low"] > plain["ci_high"] - plain["ci_low"]


def test_bootstrap_any_metric():
    y = np.array([0, 1, 2] * 30)
    p = y.copy()
    p[::7] = 0
    r = bootstrap_metric(lambda a, b: skm.f1_score(a, b, average="macro"), y, p, n_boot=200, seed=0)
    assert r["ci_low"] <= r["value"] <= r["ci_high"] < 1.0 + 1e-9


def test_length_mismatch_and_empty_are_named_errors():
    with pytest.raises(DataError):
        binary_metrics([0, 1], [0.5])
    with pytest.raises(DataError):
        binary_metrics([], [])


def test_confusion_matrix_png(tmp_path):
    path = save_confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 2], tmp_path / "f" / "cm.png",
                                 class_names=["benign", "malignant", "other"], title="test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # not a blank canvas
