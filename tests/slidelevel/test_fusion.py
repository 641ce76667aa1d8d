"""Fusion and baselines: modality masking, modality dropout, saved form, clinical SHAP."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_cmaf.slidelevel.attribution import clinical_shap
from wsi_cmaf.slidelevel.clinical import ClinicalEncoder, ClinicalSchema
from wsi_cmaf.slidelevel.data import PatientData
from wsi_cmaf.slidelevel.fusion import KINDS, SlideModel
from wsi_cmaf.slidelevel.mil import pad_bags
from wsi_cmaf.slidelevel.train import (
    SlideTrainConfig,
    fit_slide_model,
    load_slide_model,
    predict_patients,
    save_slide_model,
)

GROUPS = [(0, 4), (4, 6)]  # grade (3 categories + missing), age (value + missing)


def _batch(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    x, mask = pad_bags([torch.randn(n, 6, generator=g) for n in (3, 5, 2, 4, 1)[:b]])
    clin = torch.zeros(b, 6)
    clin[:, 1] = 1.0
    clin[:, 4] = torch.randn(b, generator=g)
    return x, mask, clin


def test_missing_clinical_is_exactly_the_image_only_path():
    torch.manual_seed(0)
    model = SlideModel("fusion", 6, GROUPS).eval()
    x, mask, clin = _batch()
    present = torch.tensor([True, False, True, False, False])
    with torch.no_grad():
        fused, aux = model(x, mask, clin, present)
        image = model.image_only(x, mask)
        garbage, _ = model(x, mask, torch.randn_like(clin) * 100, torch.zeros(5, dtype=torch.bool))
    assert torch.equal(fused[~present], image[~present])  # bit for bit
    assert torch.equal(garbage, image)  # clinical values of an absent modality are never looked at
    assert not torch.allclose(fused[present], image[present])  # where present it is used
    assert aux["modality"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert aux["clinical_attention"].shape == (5, 2)
    torch.testing.assert_close(aux["clinical_attention"].sum(1), torch.ones(5))


def test_modality_dropout_only_in_training():
    model = SlideModel("fusion", 6, GROUPS, modality_dropout=0.3)
    present = torch.ones(20000, dtype=torch.bool)
    torch.manual_seed(1)
    model.train()
    kept = model.modality_mask(present).mean().item()
    assert abs(kept - 0.7) < 0.02  # 30 % of the training patients lose their clinical data
    model.eval()
    assert model.modality_mask(present).min().item() == 1.0
    clinical_only = SlideModel("clinical", 6, GROUPS, modality_dropout=0.3).train()
    assert clinical_only.modality_mask(present).min().item() == 1.0  # its only input is never hidden
    # in eval mode, repeated calls agree (no dropout of any kind)
    x, mask, clin = _batch()
    with torch.no_grad():
        a, _ = model(x, mask, clin, torch.ones(5, dtype=torch.bool))
        b, _ = model(x, mask, clin, torch.ones(5, dtype=torch.bool))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_runs_and_round_trips(kind, tmp_path):
    torch.manual_seed(0)
    model = SlideModel(kind, 6, GROUPS if kind != "image" else None).eval()
    x, mask, clin = _batch()
    with torch.no_grad():
        logits, aux = model(x, mask, clin, torch.ones(5, dtype=torch.bool))
    assert logits.shape == (5,) and torch.isfinite(logits).all()
    assert ("attention" in aux) == (kind != "clinical")
    save_slide_model(tmp_path, model, None, SlideTrainConfig())
    again, _, doc = load_slide_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x, mask, clin, torch.ones(5, dtype=torch.bool))[0], logits)
    assert doc["model"]["kind"] == kind


def _toy(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    bags = [rng.normal(0.8 * yi, 1, (int(rng.integers(3, 8)), 6)).astype(np.float32) for yi in y]
    table = pd.DataFrame({"grade": np.where(y == 1, "3", "1"), "age": rng.normal(50 + 5 * y, 5)})
    schema = ClinicalSchema.from_dict({"variables": [
        {"name": "grade", "type": "categorical", "categories": ["1", "2", "3"]},
        {"name": "age", "type": "continuous"}]})
    enc = ClinicalEncoder(schema).fit(table)
    clin, present = enc.transform(table)
    return PatientData([f"p{i}" for i in range(n)], bags, y, ["train"] * n, clin, present), enc


def test_training_learns_and_shap_explains_the_clinical_part():
    data, enc = _toy()
    cfg = SlideTrainConfig(epochs=15, seed=0)
    model = fit_slide_model("fusion", data, cfg, [(g.start, g.stop) for _, g in enc.groups])
    pred = predict_patients(model, data)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(data.labels, pred["prob"]) > 0.9  # grade alone separates the toy classes
    off = predict_patients(model, data, present=np.zeros(len(data.labels), bool))
    assert (off["modality"] == 0).all() and not np.allclose(off["prob"], pred["prob"])
    i = 1  # a label-1 patient: grade 3 should push its probability up
    shap = clinical_shap(model, enc, data.bags[i], data.clin[i])
    assert list(shap.index) == ["grade", "age"]
    with torch.no_grad():
        x = torch.as_tensor(data.bags[i])[None]
        m = torch.ones(1, x.shape[1], dtype=torch.bool)
        p_full = torch.sigmoid(model(x, m, torch.as_tensor(data.clin[i])[None], torch.tensor([True]))[0]).item()
        p_base = torch.sigmoid(model(x, m, torch.as_tensor(enc.missing_row())[None], torch.tensor([True]))[0]).item()
    assert shap.sum() == pytest.approx(p_full - p_base, abs=1e-4)  # efficiency: exact with 2 variables
    assert shap["grade"] > 0
