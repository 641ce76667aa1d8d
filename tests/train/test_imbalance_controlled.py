"""Controlled imbalance experiment (issue 15 item 4): its design, its scores, and a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.evaluate.metrics import expected_calibration_error, rank_auroc, threshold_at_specificity
from wsi_cmaf.train.paper import controlled as C
from wsi_cmaf.train.paper.controlled_report import run_scores


def test_negative_counts_keep_the_minority_fixed() -> None:
    # 100 positives: 70:30 -> 100*70/30 = 233.3 -> 233; 95:5 -> 1900; 99:1 -> 9900
    assert [C.negatives_for(r, 100) for r in ("70:30", "95:5", "99:1")] == [233, 1900, 9900]


def _fake_data(n_pat: int = 6, per: int = 80) -> C.Data:
    rng = np.random.default_rng(0)
    labels = np.tile((np.arange(per) % 5 == 0).astype(np.int64), n_pat)  # 16 positives, 64 negatives per patient
    patients = np.repeat([f"p{i}" for i in range(n_pat)], per)
    split = np.repeat(["train"] * (n_pat - 2) + ["val", "test"], per)
    images = rng.integers(0, 255, size=(n_pat * per, 8, 8, 3), dtype=np.uint8)
    return C.Data(images, labels, patients, split)


def test_training_sets_share_positives_and_nest_negatives() -> None:
    data = _fake_data()
    cfg = C.ControlledConfig(n_patients=6, split_patients=(4, 1, 1), n_minority=2, ratios=("70:30", "95:5", "99:1"))
    sets = C.training_sets(data, cfg, seed=3)
    pos = {r: set(i for i in s if data.labels[i] == 1) for r, s in sets.items()}
    neg = {r: set(i for i in s if data.labels[i] == 0) for r, s in sets.items()}
    assert pos["70:30"] == pos["95:5"] == pos["99:1"] and len(pos["70:30"]) == 2
    assert [len(neg[r]) for r in ("70:30", "95:5", "99:1")] == [5, 38, 198]  # 2*70/30=4.67->5, 38, 198
    assert neg["70:30"] < neg["95:5"] < neg["99:1"]
    assert all(data.split[i] == "train" for s in sets.values() for i in s)
    again = C.training_sets(data, cfg, seed=3)
    assert all(np.array_equal(sets[r], again[r]) for r in sets)
    too_many = C.ControlledConfig(n_patients=6, split_patients=(4, 1, 1), n_minority=3)
    with pytest.raises(ConfigError, match="256 negatives; the design needs 3 and 297"):
        C.training_sets(data, too_many, seed=0)


def test_every_arm_of_a_seed_starts_from_the_same_weights() -> None:
    cfg = C.ControlledConfig()
    plain = C.fusion_model(cfg, 4, False, (95.0, 5.0)).state_dict()
    other = C.fusion_model(cfg, 4, False, (99.0, 1.0)).state_dict()
    dfa = C.fusion_model(cfg, 4, True, (95.0, 5.0)).state_dict()
    for key, value in plain.items():
        torch.testing.assert_close(other[key], value, rtol=0, atol=0)
        torch.testing.assert_close(dfa[key], value, rtol=0, atol=0)
    extra = sorted(set(dfa) - set(plain))
    assert extra and all(".dfa." in k for k in extra)
    different_seed = C.fusion_model(cfg, 5, False, (95.0, 5.0)).state_dict()
    assert not torch.equal(different_seed["fc.weight"], plain["fc.weight"])


def test_threshold_at_specificity_by_hand() -> None:
    y = np.array([0] * 10 + [1] * 3)
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.75, 0.95, 0.2])
    assert threshold_at_specificity(y, s, 0.8) == pytest.approx(0.8)  # 8 of 10 negatives <= 0.8
    assert threshold_at_specificity(y, s, 0.95) == pytest.approx(1.0)  # ceil(9.5) = 10th negative
    assert threshold_at_specificity(y, s, 0.1) == pytest.approx(0.1)


def test_ece_and_rank_auroc_by_hand() -> None:
    # bins of width 1/15: 0.05 and 0.06 share bin 0 (mean score 0.055, mean label 0.5);
    # 0.95 sits alone in bin 14 (label 1). ECE = 2/3*|0.5-0.055| + 1/3*|1-0.95| = 0.31333
    assert expected_calibration_error([0, 1, 1], [0.05, 0.06, 0.95]) == pytest.approx(2 / 3 * 0.445 + 1 / 3 * 0.05)
    # positives 0.8, 0.4; negatives 0.5, 0.1, 0.4: pairs won 3 + (1 + 0.5 tie) = 4.5 of 6
    y = np.array([1, 1, 0, 0, 0])
    assert rank_auroc(y, np.array([0.8, 0.4, 0.5, 0.1, 0.4])) == pytest.approx(0.75)
    assert np.isnan(rank_auroc(np.zeros(3), np.array([0.1, 0.2, 0.3])))


def test_run_scores_by_hand() -> None:
    y_val = np.array([0, 0, 0, 0, 1])
    s_val = np.array([0.1, 0.2, 0.3, 0.4, 0.9])  # 95 % specificity -> ceil(3.8)=4th negative = 0.4
    y_test = np.array([0, 0, 1, 1])
    s_test = np.array([0.3, 0.45, 0.5, 0.41])
    r = run_scores(y_val, s_val, y_test, s_test, 0.95)
    assert r["threshold"] == pytest.approx(0.4)
    assert r["sens_at_spec"] == 1.0 and r["test_spec_at_spec"] == 0.5  # 0.45 > 0.4 is a false positive
    assert r["sens_at_0.5"] == 0.5 and r["spec_at_0.5"] == 1.0
    assert r["auroc"] == pytest.approx(0.75) and not r["degenerate"]
    assert run_scores(y_val, s_val, y_test, np.full(4, 0.2), 0.95)["degenerate"]


def test_tiny_end_to_end_run_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "ctl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    sets = ["n_patients=6", "patches_per_patient=30", "split_patients=[4,1,1]", "n_minority=2", "steps=6",
            "stage1_epochs=1", "bootstrap=20", "batch_size=16"]
    cmd = [sys.executable, "-m", "wsi_cmaf", "-q", "protocol", "imbalance-controlled", "--out", str(out),
           "--seeds", "0", "1", "--ratios", "70:30", "95:5", "--losses", "ce_sqrt", "acbfl", "acbfl_dfa",
           "--no-progress"] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "results.json").read_text())
    cells = {(c["ratio"], c["arm"]) for c in summary["cells"]}
    assert cells == {(r, a) for r in ("70:30", "95:5") for a in ("ce_sqrt", "acbfl", "acbfl_dfa")}
    pairs = {(d["ratio"], d["arm"], d["reference"]) for d in summary["differences"]}
    assert ("95:5", "acbfl_dfa", "acbfl") in pairs and ("70:30", "acbfl", "ce_sqrt") in pairs
    # 2 positives at every ratio; negatives 5 (70:30) and 38 (95:5)
    assert summary["data"]["train_counts_per_seed"]["0"] == {"70:30": [5, 2], "95:5": [38, 2]}
    assert (out / "fig_imbalance_controlled.png").stat().st_size > 10_000
    # a rerun with other settings into the same folder is refused, not mixed in
    again = subprocess.run(cmd + ["--set", "steps=7"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "different settings" in again.stderr
