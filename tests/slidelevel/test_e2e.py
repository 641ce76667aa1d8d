"""train-slide / predict-slide end to end on tiny synthetic patients embedded by the real engine."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wsi_cmaf.cli import main
from wsi_cmaf.slidelevel import read_attention_map, read_embeddings
from wsi_cmaf.slidelevel.synthetic_patients import write_patient_slides


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("patients")
    manifest = write_patient_slides(root, 4, seed=0)
    assert sorted(manifest["label"]) == [0, 0, 1, 1]  # tumour burden decides: both classes exist
    manifest[["store", "label", "patient"]].to_csv(root / "manifest.csv", index=False)
    # P003 has no clinical row at all, P001 has a row with every value missing
    pd.DataFrame({"patient": ["P000", "P001", "P002"], "grade": ["3", "", "2"],
                  "age": ["61", "", "48"]}).to_csv(root / "clinical.csv", index=False)
    (root / "schema.json").write_text(json.dumps({"variables": [
        {"name": "grade", "type": "categorical", "categories": ["1", "2", "3"]},
        {"name": "age", "type": "continuous"}]}))
    return root, manifest


def test_train_and_predict_slide_cli(cohort, tmp_path):
    root, manifest = cohort
    out = tmp_path / "model"
    rc = main(["-q", "train-slide", str(root / "manifest.csv"), "--out", str(out), "--clinical",
               str(root / "clinical.csv"), "--schema", str(root / "schema.json"), "--epochs", "8"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "fusion" and metrics["n_train"] == 4 and metrics["attention_maps"] == 4
    pred = pd.read_csv(out / "predictions.csv").set_index("patient")
    assert pred.loc["P003", "modality"] == "image-only" and pred.loc["P001", "modality"] == "image-only"
    assert pred.loc["P000", "modality"] == "image+clinical"
    # the attention map sits in each store on the heatmap grid: weights of the tissue tiles sum to 1
    for store in manifest["store"]:
        att = read_attention_map(store)
        tiles, _ = read_embeddings(store)
        assert np.isfinite(att[0]).sum() == len(tiles)
        assert np.nansum(att[0]) == pytest.approx(1.0, abs=1e-5) and np.nanmax(att[1]) == pytest.approx(1.0)
    # predict-slide without any clinical table: everyone image-only; P003 unchanged
    csv = tmp_path / "pred.csv"
    assert main(["-q", "predict-slide", str(out), str(root / "manifest.csv"), "--out", str(csv)]) == 0
    again = pd.read_csv(csv).set_index("patient")
    assert (again["modality"] == "image-only").all()
    assert again.loc["P003", "prob"] == pytest.approx(pred.loc["P003", "prob"], abs=1e-7)
    assert again.loc["P000", "prob"] != pytest.approx(pred.loc["P000", "prob"], abs=1e-7)


def test_usage_and_data_errors(cohort, tmp_path):
    root, _ = cohort
    assert main(["-q", "train-slide", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "m")]) == 2
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"label": [1]}).to_csv(bad, index=False)
    assert main(["-q", "train-slide", str(bad), "--out", str(tmp_path / "m")]) == 1  # no 'store' column
