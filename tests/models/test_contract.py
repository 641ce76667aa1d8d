"""Every registered model follows timm's contract: ``forward_features`` gives a feature map,
``forward_head`` pools it to logits or (``pre_logits=True``) to a ``num_features``-wide embedding,
and ``forward_head(forward_features(x)) == model(x)``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from wsi_cmaf.models import create_model, list_models

torch.set_num_threads(2)

# Narrow variants keep each model's layout (both branches, CMAF fusion, the head MLP) at a small cost.
SMALL_CMAF = dict(mvit_stem_channels=8, mvit_channels=[16, 16, 24, 24, 32], mvit_dims=[32, 32, 32],
                  mvit_depths=[1, 1, 1], context_dim=64, num_heads=4, bottleneck_dim=8, head_hidden=[16],
                  nystrom_landmarks=16, spatial_backbone="resnet18")
SIZE = 64
# name -> (options, input builder, expected embedding width)
CASES = {
    "cmaf_net": (SMALL_CMAF, lambda x: (x,), 16),
    "multiview": (dict(backbone="cmaf_net", backbone_kwargs=SMALL_CMAF, num_views=2),
                  lambda x: (torch.stack([x, x.flip(-1)], dim=1),), 16),
    "multitask": (dict(backbone="cmaf_net", backbone_kwargs=SMALL_CMAF, tasks={"malignancy": 2, "grade": 3}),
                  lambda x: (x,), 16),
}


def _logits(out: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(out.values()), dim=1) if isinstance(out, dict) else out


def _build(name: str):
    if name not in CASES:
        raise AssertionError(f"registered model {name!r} has no contract case: add it to CASES")
    options, inputs, width = CASES[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, **options).eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return model, inputs(x), width


@pytest.mark.parametrize("name", list_models())
def test_forward_features_head_and_num_features(name):
    model, inputs, width = _build(name)
    with torch.no_grad():
        out = _logits(model(*inputs))
        fmap = model.forward_features(*inputs)
        head = _logits(model.forward_head(fmap))
        emb = model.forward_head(fmap, pre_logits=True)
    n_out = 5 if name == "multitask" else 2
    assert out.shape == (2, n_out)
    assert fmap.ndim >= 3 and fmap.shape[0] == 2  # a map of tokens or positions, not a pooled vector
    assert torch.equal(head, out)
    assert model.num_features == width and emb.shape == (2, width)
    for t in (out, fmap, emb):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", list_models())
def test_backward_gives_finite_gradients(name):
    model, inputs, _ = _build(name)
    _logits(model(*inputs)).square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)  # every parameter is on the path to the logits
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) > 0.8 * len(grads)


def test_the_registry_alone_lists_every_model():
    code = "from wsi_cmaf.models.registry import list_models; print(','.join(list_models()))"
    names = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert names.strip().split(",") == ["cmaf_net", "multitask", "multiview"]
