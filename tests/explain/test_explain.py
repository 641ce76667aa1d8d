"""wsi_cmaf.explain: map shapes and named errors, TorchScript, and maps that point at evidence."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_cmaf.explain import (
    ExplainError,
    NotCMAFNetError,
    cross_attention_maps,
    gate_map,
    gradcam_contextual,
    gradcam_spatial,
    integrated_gradients,
    occlusion,
    pointing_score,
)
from wsi_cmaf.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import explain_sanity  # noqa: E402

TINY = explain_sanity.TINY_CMAF


@pytest.fixture(scope="module")
def cmaf():
    torch.manual_seed(0)
    return create_model("cmaf_net", num_classes=2, input_size=64, **TINY).eval()


@pytest.fixture(scope="module")
def tiles():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_cmaf_maps_have_tile_resolution(cmaf, tiles):
    for fn in (gradcam_spatial, gradcam_contextual, gate_map):
        m = fn(cmaf, tiles)
        assert isinstance(m, np.ndarray) and m.shape == (2, 64, 64) and np.isfinite(m).all(), fn.__name__
    g = gate_map(cmaf, tiles)
    assert (g >= 0).all() and (g <= 1).all()
    att = cross_attention_maps(cmaf, tiles)
    assert att.received.shape == (2, 2, 64, 64) and att.tau.shape == (2,) and att.grid == (2, 2)
    np.testing.assert_allclose(att.attn.sum(-1), 1.0, rtol=1e-5)  # rows are distributions
    np.testing.assert_allclose(att.tau, cmaf.cmaf.tau.detach().numpy(), rtol=1e-6)


def test_generic_maps_on_cmaf(cmaf, tiles):
    assert integrated_gradients(cmaf, tiles, 1, n_steps=4).shape == (2, 64, 64)
    assert occlusion(cmaf, tiles, 1, window=32, stride=32).shape == (2, 64, 64)


def test_branch_maps_refuse_other_models_with_a_named_error(tiles):
    cnn = explain_sanity.tiny_cnn()
    for fn in (gradcam_spatial, gradcam_contextual, gate_map, cross_attention_maps):
        with pytest.raises(NotCMAFNetError, match="only for CMAF-Net"):
            fn(cnn, tiles)
    torch.manual_seed(0)
    no_gate = create_model("cmaf_net", num_classes=2, input_size=64, ablation="no_gating", **TINY)
    with pytest.raises(ExplainError, match="no gate"):
        gate_map(no_gate, tiles)
    with pytest.raises(ExplainError, match=r"\(B, C, H, W\)"):
        integrated_gradients(cnn, tiles[0])


def test_torchscript_model_gets_generic_maps(tiles):
    torch.manual_seed(0)
    cnn = explain_sanity.tiny_cnn().eval()
    scripted = torch.jit.trace(cnn, tiles)
    np.testing.assert_allclose(integrated_gradients(scripted, tiles, 1, n_steps=8),
                               integrated_gradients(cnn, tiles, 1, n_steps=8), atol=1e-5)
    np.testing.assert_allclose(occlusion(scripted, tiles, 1), occlusion(cnn, tiles, 1), atol=1e-5)


def test_pointing_score_units():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[:, :4, :4] = True
    perfect = pointing_score(masks.astype(float), masks)
    assert perfect.mass == 1.0 and perfect.hit == 1.0 and perfect.area == 0.25
    assert pointing_score(~masks * 1.0, masks).mass == 0.0
    with pytest.raises(ExplainError):
        pointing_score(np.zeros((2, 8, 7)), masks)


def test_maps_point_at_planted_texture_and_fail_on_shuffled_labels():
    """Pointing game + Adebayo et al. 2018 data randomisation, on a tiny CNN (~10 s)."""
    res = explain_sanity.run("cnn", size=32, region=12, steps=120, seed=0)
    base = res["random"]["mass"]
    true, shuffled = res["runs"]["true"], res["runs"]["shuffled"]
    assert true["test_acc"] >= 0.9
    for method in ("integrated_gradients", "occlusion"):
        assert true["scores"][method]["mass"] >= base + 0.4, method  # baseline ~0.14
        assert true["scores"][method]["hit"] >= 0.8, method
        assert shuffled["scores"][method]["mass"] <= base + 0.1, method
