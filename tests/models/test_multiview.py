"""Gated multi-view fusion (issue 17, item 2): missing views, view dropout, gradients, IO."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_cmaf.errors import ModelConfigError, ModelError
from wsi_cmaf.models import ModelConfig, create_model, load_model, save_model
from wsi_cmaf.models.multiview import GatedViewAttention

# A small CMAF-Net (the packaged demo model's widths) so the tests run in seconds on CPU.
SMALL = dict(spatial_backbone="test_resnet", context_dim=96, num_heads=4, mvit_channels=(16, 24, 32, 48, 64),
             mvit_dims=(48, 64, 80), mvit_depths=(1, 1, 1), bottleneck_dim=32, head_hidden=(64,),
             nystrom_landmarks=16, attention="nystrom")
SIZE = 40


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("multiview", num_classes=2, backbone="cmaf_net", backbone_kwargs=SMALL, **kw)


def _tiny(**kw) -> torch.nn.Module:
    """timm's tiny test ResNet as the backbone, for tests about the wrapper's own logic."""
    torch.manual_seed(0)
    return create_model("multiview", num_classes=2, backbone="timm:test_resnet", **kw)


def _views(b: int = 3, v: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, v, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_gated_attention_matches_hand_computation():
    att = GatedViewAttention(1, 1)
    with torch.no_grad():
        att.v.weight.fill_(1.0), att.v.bias.zero_()
        att.u.weight.zero_(), att.u.bias.zero_()  # sigmoid(0) = 0.5
        att.w.weight.fill_(2.0), att.w.bias.zero_()  # logit = 2 * tanh(e) * 0.5 = tanh(e)
    e = torch.tensor([[[0.0], [math.atanh(0.5)]]])  # logits 0 and 0.5
    fused, w = att(e, torch.ones(1, 2, dtype=torch.bool))
    # softmax([0, 0.5]) = [1 / (1 + e^0.5), e^0.5 / (1 + e^0.5)] = [0.377541, 0.622459]
    assert w[0].tolist() == pytest.approx([0.377541, 0.622459], abs=1e-6)
    assert fused.item() == pytest.approx(0.622459 * 0.549306, abs=1e-6)
    # the second view missing: all weight on the first, the fused value is its embedding (0)
    fused, w = att(e, torch.tensor([[True, False]]))
    assert w[0].tolist() == [1.0, 0.0] and fused.item() == 0.0


@pytest.mark.parametrize("train", [False, True])
def test_missing_view_garbage_does_not_change_the_prediction(train):
    model = _model().train(train)
    x = _views()
    missing = torch.tensor([[False, True], [False, False], [False, True]])
    garbage = x.clone()
    garbage[0, 1] = 1e4 * torch.randn(3, SIZE, SIZE)
    garbage[2, 1] = float("nan")
    torch.manual_seed(5)  # the same dropout / bottleneck noise for both passes in training mode
    a = model(x, missing)
    torch.manual_seed(5)
    b = model(garbage, missing)
    assert torch.equal(a, b)
    # and a present view's pixels do matter (the test could fail)
    changed = x.clone()
    changed[1, 1] += 1.0
    torch.manual_seed(5)
    assert not torch.allclose(model(changed, missing)[1], a[1])


def test_missing_views_get_exactly_zero_attention():
    model = _model(num_views=3).eval()
    missing = torch.tensor([[False, True, False], [False, False, True], [False, True, True]])
    with torch.no_grad():
        _, aux = model.forward_with_aux(_views(3, 3), missing)
    w = aux["view_attn"]
    assert aux["kl_s"].shape == (int((~missing).sum()),)  # the backbone's terms, one per embedded view
    assert torch.all(w[missing] == 0.0)
    assert torch.all(w[~missing] > 0.0)
    assert w.sum(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert w[2, 0].item() == 1.0  # the only present view


def test_every_view_missing_is_an_error_or_the_named_fallback():
    x = _views(2)
    missing = torch.tensor([[True, True], [False, True]])
    with pytest.raises(ModelError, match=r"every view is missing for sample\(s\) \[0\]"):
        _tiny().eval()(x, missing)
    model = _tiny(all_missing="zeros").eval()
    with torch.no_grad():
        out = model(x, missing)
    assert torch.equal(out[0], model.heads.heads["malignancy"].bias)  # zero embedding -> head bias


def test_view_dropout_only_in_training_and_never_drops_view_zero():
    model = _tiny(num_views=3, view_dropout=0.5)
    torch.manual_seed(0)
    model.eval()
    assert bool(model.view_mask(4000, None, torch.device("cpu")).all())
    model.train()
    present = model.view_mask(4000, None, torch.device("cpu"))
    assert bool(present[:, 0].all())
    rate = 1.0 - present[:, 1:].float().mean(dim=0)
    assert rate.tolist() == pytest.approx([0.5, 0.5], abs=0.04)
    # view 0 missing and the only other present view dropped: the rule "never drop every view" keeps it
    model = _tiny(num_views=2, view_dropout=0.999)
    missing = torch.tensor([[True, False]] * 200)
    assert bool(model.train().view_mask(200, missing, torch.device("cpu"))[:, 1].all())
    anchor = _tiny(num_views=2, view_dropout=0.9, drop_anchor=True).train()
    present = anchor.view_mask(2000, None, torch.device("cpu"))
    assert bool(present.any(dim=1).all()) and not bool(present[:, 0].all())


def test_gradient_reaches_backbone_and_gate():
    model = _model().train()
    logits = model(_views(2), torch.tensor([[False, False], [False, True]]))
    logits.logsumexp(dim=1).sum().backward()
    for name in ("attention.v.weight", "attention.u.weight", "attention.w.weight", "view_embed",
                 "backbone.cmaf.log_tau"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert len(backbone_grads) > 50 and all(torch.isfinite(g).all() for g in backbone_grads)


def test_multitask_output_and_single_task_tensor():
    single = _tiny().eval()
    with torch.no_grad():
        assert single(_views(2)).shape == (2, 2)
    multi = _tiny(tasks={"malignancy": 2, "subtype": 8}).eval()
    with torch.no_grad():
        out = multi(_views(2))
    assert set(out) == {"malignancy", "subtype"}
    assert out["malignancy"].shape == (2, 2) and out["subtype"].shape == (2, 8)
    with pytest.raises(ModelConfigError, match="first task"):
        _tiny(tasks={"subtype": 8, "malignancy": 2})
    with pytest.raises(ModelConfigError, match="dfa"):
        create_model("multiview", backbone_kwargs={**SMALL, "dfa": True})


def test_single_view_multitask_model_takes_plain_batches():
    torch.manual_seed(0)
    model = create_model("multitask", tasks={"malignancy": 2, "subtype": 8}, backbone="timm:test_resnet").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out["subtype"].shape == (2, 8)


def test_save_and_load_round_trip(tmp_path):
    model = _model(tasks={"malignancy": 2, "subtype": 8}, view_dropout=0.3).eval()
    save_model(model, ModelConfig(architecture="multiview", input_size=SIZE, stain_normalization=None), tmp_path)
    loaded, cfg = load_model(tmp_path)
    assert cfg.model_kwargs["backbone_kwargs"]["context_dim"] == 96
    assert cfg.model_kwargs["tasks"] == {"malignancy": 2, "subtype": 8}
    x = _views(2)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
