"""Synthetic H&E-like patches: determinism, exact imbalance, learnable-but-subtle signal, layout."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.data.builders import build_idc_manifest
from wsi_cmaf.train.data.manifest import _IDC_RE, read_manifest
from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, generate_patches, write_synthetic_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "data_manifests"


def _features(images: np.ndarray) -> np.ndarray:
    g = images.astype(np.float32).mean(-1)
    return np.stack([g.mean((1, 2)), (g < 140).mean((1, 2)), (g < 110).mean((1, 2)), g.std((1, 2))], 1)


def _data(signal: float):
    return generate_patches(SyntheticPatchConfig(n_patients=12, patches_per_patient=100, ratio="50:50",
                                                 signal=signal, seed=7))


def _within_patient_auc(d) -> float:
    """Mean over patients of the AUC of the dark-pixel fraction (patient colour cancels out)."""
    dark = _features(d.images)[:, 1]
    aucs = [roc_auc_score(d.labels[d.patient_ids == p], dark[d.patient_ids == p])
            for p in np.unique(d.patient_ids) if 0 < d.labels[d.patient_ids == p].mean() < 1]
    return float(np.mean(aucs))


def _held_out_auc(d) -> float:
    """AUC of a logistic regression on simple darkness features, trained and tested on different patients."""
    x = _features(d.images)
    train = np.isin(d.patient_ids, [f"syn{i:04d}" for i in range(8)])
    clf = LogisticRegression(max_iter=1000).fit(x[train], d.labels[train])
    return roc_auc_score(d.labels[~train], clf.predict_proba(x[~train])[:, 1])


def test_deterministic_by_seed():
    cfg = SyntheticPatchConfig(n_patients=3, patches_per_patient=20, seed=11)
    a, b = generate_patches(cfg), generate_patches(cfg)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = generate_patches(SyntheticPatchConfig(n_patients=3, patches_per_patient=20, seed=12))
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("ratio,expected_pos", [("70:30", 120), ("95:5", 20), ("99:1", 4), ("50:50", 200)])
def test_imbalance_is_exact(ratio, expected_pos):
    d = generate_patches(SyntheticPatchConfig(n_patients=8, patches_per_patient=50, ratio=ratio, patch_size=16))
    assert d.images.shape == (400, 16, 16, 3) and d.images.dtype == np.uint8
    assert int(d.labels.sum()) == expected_pos


def test_patients_differ_in_positive_fraction_and_stain():
    from wsi_cmaf.stain import fit_macenko

    def spread(stain_variation: float) -> tuple[float, float]:
        d = generate_patches(SyntheticPatchConfig(n_patients=6, patches_per_patient=40,
                                                  stain_variation=stain_variation, seed=2))
        fits = np.stack([fit_macenko(d.images[d.patient_ids == p]).stain_matrix for p in np.unique(d.patient_ids)])
        frac = pd.Series(d.labels).groupby(d.patient_ids).mean()
        return float(fits.std(0).mean()), float(frac.std())

    varied, frac_std = spread(1.0)
    flat, _ = spread(0.0)
    assert frac_std > 0.1
    assert varied > 3 * flat, (varied, flat)


def test_signal_is_learnable_but_subtle_and_absent_at_zero():
    d0, d_half, d1 = _data(0.0), _data(0.5), _data(1.0)
    w0, w_half, w1 = _within_patient_auc(d0), _within_patient_auc(d_half), _within_patient_auc(d1)
    assert 0.4 < w0 < 0.6, w0
    assert 0.6 < w_half < 0.95, w_half  # learnable, not trivially separable
    assert w1 > w_half
    assert _held_out_auc(d1) > 0.75  # the cue transfers to unseen patients


def test_generation_is_fast():
    cfg = SyntheticPatchConfig(n_patients=4, patches_per_patient=500)
    generate_patches(SyntheticPatchConfig(n_patients=1, patches_per_patient=4))  # warm-up
    t = time.perf_counter()
    generate_patches(cfg)
    rate = cfg.n_patches / (time.perf_counter() - t)
    assert rate > 300, f"{rate:.0f} patches/s"  # ~1900/s on one core, ~3400/s on two; loose for shared CI


def test_written_dataset_has_idc_layout_and_consistent_manifest(tmp_path):
    cfg = SyntheticPatchConfig(n_patients=6, patches_per_patient=15, seed=4)
    written = write_synthetic_dataset(tmp_path, cfg, formats=("png",))
    m = read_manifest(written["manifest"], check_images="decode")
    assert len(m) == 90
    for rel in m.frame["path"]:
        assert _IDC_RE.match(Path(rel).name)
    rebuilt = build_idc_manifest(tmp_path, seed=cfg.seed, relative_to=tmp_path)
    ours = m.frame.set_index("path")
    assert (rebuilt.set_index("path").loc[ours.index, "split"] == ours["split"]).all()


def test_bad_config():
    with pytest.raises(ConfigError):
        SyntheticPatchConfig(ratio="70")
    with pytest.raises(ConfigError):
        SyntheticPatchConfig(patch_size=4)
    with pytest.raises(ConfigError):
        write_synthetic_dataset("/tmp/never", SyntheticPatchConfig(n_patients=1, patches_per_patient=1),
                                formats=("jpeg",))


@pytest.mark.parametrize("csv", sorted(EXAMPLES.glob("synthetic_*/manifest.csv")) or [None])
def test_example_manifests_match_regeneration(csv, tmp_path):
    if csv is None:
        pytest.skip("no example manifests in data_manifests/")
    import json

    config = SyntheticPatchConfig(**json.loads((csv.parent / "config.json").read_text()))
    written = write_synthetic_dataset(tmp_path, config, formats=("png",))
    assert written["manifest"].read_text() == csv.read_text()
