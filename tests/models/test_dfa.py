"""Dynamic Focal Attention (DFA) in the CMAF block: off-switch, prior initialisation, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.models import CMAFConfig, create_model, load_model

TINY = dict(spatial_backbone="test_resnet", mvit_stem_channels=8, mvit_channels=[8, 16, 16, 16, 16],
            mvit_dims=[16, 16, 16], mvit_depths=[1, 1, 1], mvit_heads=2, context_dim=32, num_heads=2,
            bottleneck_dim=8, head_hidden=[16], nystrom_landmarks=16)


def _tiny(seed: int = 0, num_classes: int = 3, **kw):
    torch.manual_seed(seed)
    return create_model("cmaf_net", num_classes=num_classes, input_size=64, **TINY, **kw)


def test_dfa_is_off_by_default_and_old_configs_stay_off():
    assert CMAFConfig().dfa is False
    assert CMAFConfig.from_dict({"num_heads": 4, "context_dim": 32}).dfa is False
    model = _tiny()
    assert model.cmaf.dfa is None and model.dfa_dims == 0
    assert not any("dfa" in k for k in model.state_dict())


def test_dfa_off_draws_the_same_weights_as_before():
    """DFA's parameters are created last: every other weight of a DFA model equals the DFA-off one."""
    off, on = _tiny(seed=3).state_dict(), _tiny(seed=3, dfa=True).state_dict()
    extra = set(on) - set(off)
    assert extra and all(".dfa." in k for k in extra)
    assert all(torch.equal(off[k], on[k]) for k in off), [k for k in off if not torch.equal(off[k], on[k])]


def test_packaged_checkpoint_unchanged_with_explicit_dfa_false():
    model, cfg = load_model("wsi_cmaf/models/weights/default")
    assert cfg.model_kwargs["dfa"] is False and cfg.model_kwargs["dfa_class_counts"] is None
    explicit = create_model("cmaf_net", num_classes=cfg.num_classes, **{**cfg.model_kwargs, "dfa": False})
    explicit.load_state_dict(model.state_dict(), strict=True)
    model.eval(), explicit.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), explicit(x))


def test_prior_initialisation_from_counts_and_uniform():
    counts = (950.0, 45.0, 5.0)
    model = _tiny(dfa=True, dfa_class_counts=counts)
    expected = torch.tensor([math.log(c / sum(counts)) for c in counts])
    bias = model.cmaf.dfa.class_bias.detach()
    assert bias.shape == (2, 3)
    torch.testing.assert_close(bias, expected.repeat(2, 1))
    uniform = _tiny(dfa=True).cmaf.dfa.class_bias.detach()
    torch.testing.assert_close(uniform, torch.full((2, 3), -math.log(3)))
    model.cmaf.dfa.reset_prior((1.0, 1.0, 2.0))
    torch.testing.assert_close(model.cmaf.dfa.class_bias[0].detach(), torch.tensor([0.25, 0.25, 0.5]).log())


def test_bad_counts_are_named_errors():
    with pytest.raises(ModelConfigError, match="entries for 3 classes"):
        _tiny(dfa=True, dfa_class_counts=(1.0, 2.0))
    with pytest.raises(ModelConfigError, match="positive"):
        CMAFConfig(dfa=True, dfa_class_counts=(1.0, 0.0))
    with pytest.raises(ModelConfigError, match="needs the CMAF block"):
        CMAFConfig(dfa=True, branches="cnn_only")


def test_gradients_reach_every_dfa_parameter():
    model = _tiny(dfa=True, dfa_class_counts=(90.0, 9.0, 1.0)).train()
    x = torch.randn(4, 3, 64, 64)
    logits, aux = model.forward_with_aux(x)
    assert aux["dfa_attn"].shape[:3] == (4, 2, 3)
    torch.testing.assert_close(aux["dfa_attn"].sum(dim=2), torch.ones(4, 2, aux["dfa_attn"].shape[-1]))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 2])).backward()
    for name, p in model.cmaf.dfa.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_class_bias_changes_logits_but_a_common_shift_does_not():
    """The softmax runs over classes: one class's bias matters, a shift of all of them cancels."""
    model = _tiny(dfa=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        model.cmaf.dfa.class_bias.add_(1.5)
        torch.testing.assert_close(model(x), base)
        model.cmaf.dfa.class_bias[:, 0] += 3.0
        assert not torch.allclose(model(x), base, atol=1e-6)


def test_plain_and_aux_paths_agree_with_dfa():
    model = _tiny(dfa=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_with_aux(x)[0], atol=1e-5, rtol=1e-5)


def test_saved_config_names_dfa_fields_when_off_and_round_trips_when_on():
    off = CMAFConfig().to_dict()
    assert off["dfa"] is False and off["dfa_class_counts"] is None
    assert CMAFConfig.from_dict(off) == CMAFConfig()
    on = CMAFConfig(dfa=True, dfa_class_counts=(3, 1))
    assert CMAFConfig.from_dict(on.to_dict()) == on
