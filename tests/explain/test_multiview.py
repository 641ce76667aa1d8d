"""``wsi-cmaf explain`` on multi-view and multi-task models: maps of the tile view with its context
held fixed (checked through Integrated Gradients' completeness), the view weights in the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers.multiview import VIEWS, saved_multiview_model, views_by_hand
from wsi_cmaf.explain.report import explain_store
from wsi_cmaf.explain.slide import ExplainSettings, explain_slide
from wsi_cmaf.explain.views import TileViewForward
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.models import ModelConfig, create_model, save_model
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.slide.synthetic import write_synthetic_slide

torch.set_num_threads(1)
CFG = InferenceConfig(device="cpu", batch_size=64, progress=False, overlay=False, geojson=False, compile="off",
                      precision="off")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain_mv")
    slide = write_synthetic_slide(d / "s.tiff", 4800, 3200, 0.5, seed=3, tumour=True).path
    model_dir, model = saved_multiview_model(d / "mv")
    res = analyze_slide(slide, model=model_dir, out=d / "out", config=CFG)
    return slide, model_dir, model, res


def test_maps_are_of_the_tile_with_its_context_fixed(run):
    slide, model_dir, model, res = run
    settings = ExplainSettings(methods=("ig",), steps=64, batch=4)
    expl = explain_slide(res.store, model=model_dir, top_k=3, settings=settings)
    n = len(expl.choice)
    assert expl.view_weights.shape == (n, 2) and expl.views == VIEWS
    np.testing.assert_allclose(expl.view_weights.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(expl.recomputed, expl.choice.probability, atol=1e-5)  # the analysis's pixels
    # IG completeness: the map sums to logit(tile, context) - logit(black tile, same context)
    views, missing, _ = views_by_hand(slide, HeatmapStore.open(res.store), expl.choice.rows, expl.choice.cols)
    f = TileViewForward(model.eval())
    with torch.no_grad():
        full = f(views[0], views[1], missing)[:, 1]
        base = f(torch.zeros_like(views[0]), views[1], missing)[:, 1]
        no_ctx = torch.stack([torch.zeros_like(missing[:, 0]), torch.ones_like(missing[:, 1])], 1)
        without_context = f(torch.zeros_like(views[0]), views[1], no_ctx)[:, 1]
    total = torch.as_tensor(expl.saliency["ig"].sum(axis=(1, 2)))
    np.testing.assert_allclose(total.numpy(), (full - base).numpy(), rtol=0.05, atol=0.05)
    # teeth: the context really enters (another context gives another baseline logit)
    assert (base - without_context).abs().max() > 0.1


def test_json_and_gallery_for_a_multi_view_store(run, tmp_path):
    slide, model_dir, model, res = run
    expl, paths = explain_store(res.store, model=model_dir, out=tmp_path / "x", top_k=2,
                                settings=ExplainSettings(methods=("occlusion",), batch=4))
    doc = json.loads((tmp_path / "x" / "s_explain.json").read_text())
    assert paths["gallery"].is_file() and "store_occlusion" in paths
    assert doc["views"]["views"] == VIEWS
    assert all(len(t["view_weights"]) == 2 for t in doc["tiles"])
    assert "attention and gate maps exist only for CMAF-Net" in (doc["note"] or "")
    # the model's own class, not the tile-view wrapper the explanation runs it through
    assert expl.model["architecture"] == "MultiViewNet"
    # the gallery gains one column per context view, showing its pixels
    from PIL import Image

    from wsi_cmaf.explain.gallery import gallery_columns, gallery_size

    assert gallery_columns(expl) == ["tile", "view1", "occlusion"]
    assert len(expl.context) == 1 and expl.context[0].shape == (2 * 2, 50, 50, 3)
    assert Image.open(paths["gallery"]).size == gallery_size(len(expl.choice), 3)


def test_multitask_model_is_explained_on_its_primary_task(run, tmp_path):
    slide, _, _, _ = run
    torch.manual_seed(0)
    model = create_model("multitask", num_classes=2, backbone="timm:test_resnet",
                         tasks={"malignancy": 2, "subtype": 8}).eval()
    cfg = ModelConfig(architecture="multitask", num_classes=2, class_names=["benign", "malignant"], input_size=32,
                      stain_normalization=None, weights_note="test model (random weights, seed 0)")
    model_dir = save_model(model, cfg, tmp_path / "mt")
    res = analyze_slide(slide, model=model_dir, out=tmp_path / "out", config=CFG)
    expl = explain_slide(res.store, model=model_dir, top_k=2, settings=ExplainSettings(methods=("ig",), steps=8))
    np.testing.assert_allclose(expl.recomputed, expl.choice.probability, atol=1e-5)
    assert expl.view_weights is None and expl.saliency["ig"].shape[1:] == (32, 32)
    assert expl.model["architecture"] == type(model).__name__
