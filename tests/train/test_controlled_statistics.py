"""The controlled experiment's paired statistics by value, its budget, and its rederivation from
the stored scores (with the provenance every results.json records)."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_cmaf.train.paper import controlled as C
from wsi_cmaf.train.paper.controlled_report import paired_differences, per_run_table, seed_interval

ROOT = Path(__file__).resolve().parents[2]


def _labels_only(n_test_patients: int = 4) -> C.Data:
    """Validation: 1 patient; test: ``n_test_patients`` patients of 3 negatives + 2 positives each."""
    per = np.array([0, 0, 0, 1, 1])
    labels = np.tile(per, 1 + n_test_patients)
    patients = np.repeat([f"p{i}" for i in range(1 + n_test_patients)], len(per))
    split = np.array(["val"] * len(per) + ["test"] * (len(per) * n_test_patients))
    return C.Data(np.empty((0, 0, 0, 3), np.uint8), labels, patients, split)


def _results(data: C.Data, test_scores: dict[tuple[int, str], np.ndarray]) -> dict[int, dict]:
    n_val = int((data.split == "val").sum())
    val = np.linspace(0.1, 0.9, n_val)
    out: dict[int, dict] = {}
    for (seed, arm), s in test_scores.items():
        out.setdefault(seed, {"scores": {}})["scores"][f"70:30|{arm}"] = {"val": val, "test": s}
    return out


def _cfg(seeds=(0, 1), bootstrap: int = 400) -> C.ControlledConfig:
    return C.ControlledConfig(ratios=("70:30",), arms=("ce_sqrt", "acbfl"), seeds=tuple(seeds), bootstrap=bootstrap)


def test_paired_bootstrap_pairs_each_resample_across_arms() -> None:
    """An arm that ranks exactly as the reference (a monotone transform of its scores) differs by
    exactly 0 in every patient resample, so every interval is [0, 0]. Resampling the two arms'
    patients independently would give a non-zero spread."""
    data = _labels_only()
    rng = np.random.default_rng(3)
    n_test = int((data.split == "test").sum())
    scores = {}
    for seed in (0, 1):
        ref = rng.random(n_test)
        scores[(seed, "ce_sqrt")], scores[(seed, "acbfl")] = ref, 0.5 * ref ** 2  # same order
    cfg = _cfg()
    results = _results(data, scores)
    runs = per_run_table(cfg, data, results)
    d = paired_differences(cfg, data, results, runs).set_index("arm").loc["acbfl"]
    for key in ("d_auroc", "d_auroc_lo", "d_auroc_hi", "d_auroc_seed_lo", "d_auroc_seed_hi", "d_auroc_2l_lo",
                "d_auroc_2l_hi"):
        assert d[key] == 0.0, key
    assert d["wins_auroc"] == 0


def test_paired_differences_by_hand() -> None:
    """Seed 0: the reference scores everything 0.5 (AUROC 0.5), the arm ranks perfectly (1.0);
    seed 1: both rank perfectly. Per-seed differences 0.5 and 0: mean 0.25 in every patient
    resample (each test patient holds both classes), so the patient CI is [0.25, 0.25]; the seed
    t-interval is 0.25 ± t(0.975, 1)·sd/√2 with sd = 0.5/√2; the two-level bootstrap draws seed
    pairs, so its values are 0, 0.25 or 0.5 and its 95 % interval is [0, 0.5]."""
    data = _labels_only()
    y = data.labels[data.split == "test"]
    perfect = np.where(y == 1, 0.9, 0.1) + np.arange(len(y)) * 1e-4
    cfg = _cfg()
    results = _results(data, {(0, "ce_sqrt"): np.full(len(y), 0.5), (0, "acbfl"): perfect,
                              (1, "ce_sqrt"): perfect, (1, "acbfl"): perfect})
    runs = per_run_table(cfg, data, results)
    d = paired_differences(cfg, data, results, runs).set_index("arm").loc["acbfl"]
    assert d["d_auroc"] == pytest.approx(0.25)
    assert (d["d_auroc_lo"], d["d_auroc_hi"]) == pytest.approx((0.25, 0.25))
    half = 12.706204736174707 * (0.5 / math.sqrt(2)) / math.sqrt(2)  # t(0.975, 1) = 12.7062
    assert (d["d_auroc_seed_lo"], d["d_auroc_seed_hi"]) == pytest.approx((0.25 - half, 0.25 + half))
    assert (d["d_auroc_2l_lo"], d["d_auroc_2l_hi"]) == pytest.approx((0.0, 0.5))
    assert d["wins_auroc"] == 1


def test_seed_interval_by_hand() -> None:
    # d = (1, 2, 3): mean 2, sd 1, t(0.975, 2) = 4.302653 -> 2 ± 4.302653/√3
    lo, hi = seed_interval(np.array([1.0, 2.0, 3.0]))
    assert (lo, hi) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), abs=1e-6)
    assert all(math.isnan(v) for v in seed_interval(np.array([1.0])))


def test_budget_is_passes_over_the_data() -> None:
    cfg = C.ControlledConfig(passes=20.0, batch_size=64)
    # 333 samples (70:30 with 100 positives): ceil(20*333/64) = 105; 10,000 (99:1): 3125
    assert cfg.fusion_steps(333) == 105 and cfg.fusion_steps(10_000) == 3125
    assert C.ControlledConfig(steps=300).fusion_steps(10_000) == 300
    assert C.ControlledConfig(batch_size=64).fusion_steps(20) == 20  # batch capped at the set: 20 passes of 1 step


def test_new_arms_are_the_mechanism_and_the_shipped_objective() -> None:
    assert C.ARMS["acbfl_shipped"][3] == {"class_weighted_ib": True}
    assert C.ARMS["acbfl_no_class_gamma"][1] == {"class_gamma": False}
    assert C.ARMS["acbfl_no_dynamic"][1] == {"dynamic_alpha": False}
    off = C.ARMS["acbfl_no_reg"][3]
    assert off == {"beta1": 0.0, "beta2": 0.0, "diversity_weight": 0.0, "entropy_weight": 0.0,
                   "orthogonality_weight": 0.0}


def test_tiny_run_is_rederived_exactly_and_records_provenance(tmp_path: Path) -> None:
    from wsi_cmaf.train.paper.controlled_scores import rederive, seed_path

    cfg = C.ControlledConfig(n_patients=6, patches_per_patient=30, split_patients=(4, 1, 1), n_minority=2,
                             ratios=("70:30", "95:5"), arms=("ce_sqrt", "acbfl", "acbfl_shipped"), seeds=(0, 1),
                             steps=4, stage1_epochs=1, bootstrap=20, batch_size=16)
    out = tmp_path / "run"

    def head() -> str:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()

    before = head()  # the tree is shared: someone may commit while this runs
    summary = C.run_controlled(cfg, out, progress=False)
    prov = summary["provenance"]
    assert prov["commit"] in {before, head()} and len(prov["commit"]) == 40 and isinstance(prov["dirty"], bool)
    import numpy
    import timm
    import torch

    assert (prov["python"], prov["torch"], prov["timm"], prov["numpy"]) == (
        platform.python_version(), torch.__version__, timm.__version__, numpy.__version__)
    assert prov["device"].startswith("cpu") and prov["command"]
    # the scores are stored compactly: float16 margins
    with np.load(seed_path(out, 0)) as z:
        assert {z[k].dtype for k in z.files} == {np.dtype(np.float16)}
    # rederived elsewhere from the stored scores and labels alone (the cached images deleted)
    (out / "data.npz").unlink()
    again = rederive(out, tmp_path / "again")
    assert again["cells"] == summary["cells"] and again["differences"] == summary["differences"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), pd.read_csv(tmp_path / "again" / "runs.csv"))
    assert again["provenance"] == prov and "rederived_by" in again
    assert json.loads((out / "results.json").read_text())["budget"]["fusion_steps"] == {"70:30": 4, "95:5": 4}


def test_seed_level_table_from_runs_alone() -> None:
    """Seeds 0-2 with AUROC differences 0.01, 0.02, 0.03: mean 0.02, t-interval 0.02 ± 4.302653·0.01/√3."""
    from wsi_cmaf.train.paper.controlled_report import seed_level_table

    rows = []
    for s, d in enumerate((0.01, 0.02, 0.03)):
        rows += [{"seed": s, "ratio": "95:5", "arm": "ce_sqrt", "auroc": 0.8, "sens_at_spec": 0.3},
                 {"seed": s, "ratio": "95:5", "arm": "acbfl", "auroc": 0.8 + d, "sens_at_spec": 0.3}]
    t = seed_level_table(pd.DataFrame(rows)).set_index("arm").loc["acbfl"]
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert t["d_auroc"] == pytest.approx(0.02)
    assert (t["d_auroc_seed_lo"], t["d_auroc_seed_hi"]) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-6)
    assert (t["d_sens_at_spec_seed_lo"], t["d_sens_at_spec_seed_hi"]) == (0.0, 0.0)
