"""VSSM (VMamba-style SS2D) block and its use as CMAF-Net's context branch (issue 17, item 2)."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.models import CMAFConfig, ModelConfig, create_model, load_model, save_model
from wsi_cmaf.models.vssm import SS2D, VSSBlock, cross_merge, cross_scan, selective_scan

PACKAGED = "wsi_cmaf/models/weights/default"
SMALL = dict(spatial_backbone="test_resnet", context_dim=96, num_heads=4, mvit_channels=(16, 24, 32, 48, 64),
             mvit_dims=(48, 64, 80), mvit_depths=(1, 1, 1), bottleneck_dim=32, head_hidden=(64,))


def _reference_scan(u, dt, A, B, C, D):
    """The S6 recurrence written step by step in float64: h = exp(Δ A) h + Δ B u, y = C·h + D u."""
    b, g, d, length = u.shape
    h = torch.zeros(b, g, d, A.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[..., t, None] * A[None])
        h = decay * h + dt[..., t, None] * u[..., t, None] * B[:, :, None, :, t]
        ys.append((h * C[:, :, None, :, t]).sum(-1) + D[None] * u[..., t])
    return torch.stack(ys, dim=-1)


def test_scan_by_hand():
    # decay exp(1 * -ln 2) = 0.5, B = C = 1, u = 1, 2, 3: h = 1, 0.5 + 2 = 2.5, 1.25 + 3 = 4.25
    u = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    y = selective_scan(u, torch.ones(1, 1, 1, 3), torch.tensor([[[-math.log(2.0)]]]),
                       torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1, 3), torch.zeros(1, 1), chunk=2)
    assert y.flatten().tolist() == pytest.approx([1.0, 2.5, 4.25], abs=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("dt_scale", [0.1, 2.0, 8.0])  # slow, fast and floored decay (dt·|A| up to 40 > 16)
def test_scan_matches_the_recurrence(chunk, dt_scale):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 4, 3, 37, generator=g, dtype=torch.float64)
    dt = torch.rand(2, 4, 3, 37, generator=g, dtype=torch.float64) * dt_scale
    A = -torch.rand(4, 3, 5, generator=g, dtype=torch.float64) * 5
    B = torch.randn(2, 4, 5, 37, generator=g, dtype=torch.float64)
    C = torch.randn(2, 4, 5, 37, generator=g, dtype=torch.float64)
    D = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ref = _reference_scan(u, dt, A, B, C, D)
    y = selective_scan(*(t.float() for t in (u, dt, A, B, C, D)), chunk=chunk)
    assert y.dtype == torch.float32
    assert (y.double() - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


def test_scan_is_causal():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(1, 1, 2, 20, generator=g), torch.rand(1, 1, 2, 20, generator=g),
            -torch.rand(1, 2, 3, generator=g), torch.randn(1, 1, 3, 20, generator=g),
            torch.randn(1, 1, 3, 20, generator=g)]
    y = selective_scan(*args, chunk=8)
    args[0] = args[0].clone()
    args[0][..., 11] += 5.0
    y2 = selective_scan(*args, chunk=8)
    assert torch.equal(y[..., :11], y2[..., :11])
    assert (y[..., 11:] - y2[..., 11:]).abs().amax() > 1e-3


def test_cross_scan_orders_by_hand():
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    xs = cross_scan(x)
    assert xs[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert xs[0, 1, 0].tolist() == [0, 3, 1, 4, 2, 5]
    assert xs[0, 2, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert xs[0, 3, 0].tolist() == [5, 2, 4, 1, 3, 0]
    assert torch.equal(cross_merge(xs, 2, 3), 4 * x)


def test_ss2d_sees_the_whole_grid_and_gradients_flow():
    torch.manual_seed(0)
    block = VSSBlock(16, d_state=3, expand=1.0)
    x = torch.randn(2, 5, 6, 16, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    # the top-left output depends on the bottom-right input (reached only by the reversed scans)
    (grad,) = torch.autograd.grad(out[0, 0, 0].sum(), x, retain_graph=True)
    assert grad[0, -1, -1].abs().sum() > 0 and grad[1].abs().sum() == 0
    out.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert isinstance(block.ss2d, SS2D)


def test_cmaf_net_with_vssm_context_branch(tmp_path):
    torch.manual_seed(0)
    model = create_model("cmaf_net", context_branch="vssm", vssm_d_state=2, **SMALL)
    body = model.contextual.bodies[1]
    assert body.mixer == "vssm" and isinstance(body.transformer[0], VSSBlock)
    x = torch.randn(2, 3, 50, 50)
    logits, aux = model.forward_with_aux(x)
    assert logits.shape == (2, 2) and "z_t" in aux
    logits.sum().backward()
    assert body.transformer[0].ss2d.A_log.grad.abs().sum() > 0
    model.eval()
    save_model(model, ModelConfig(input_size=50, stain_normalization=None), tmp_path)
    loaded, cfg = load_model(tmp_path)
    assert cfg.model_kwargs["context_branch"] == "vssm" and cfg.model_kwargs["vssm_d_state"] == 2
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(ModelConfigError, match="context_branch"):
        CMAFConfig(context_branch="mamba")


def test_default_stays_mobilevit_and_packaged_weights_unchanged():
    assert CMAFConfig().context_branch == "mobilevit"
    saved = CMAFConfig().to_dict()
    assert (saved["context_branch"], saved["vssm_d_state"], saved["vssm_expand"]) == ("mobilevit", 4, 1.0)
    model, cfg = load_model(PACKAGED)  # strict: no tensor added or renamed
    assert cfg.model_kwargs["context_branch"] == "mobilevit"
    explicit = create_model("cmaf_net", num_classes=cfg.num_classes,
                            **{**cfg.model_kwargs, "context_branch": "mobilevit"})
    assert set(explicit.state_dict()) == set(model.state_dict())
    explicit.load_state_dict(model.state_dict(), strict=True)
    explicit.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), explicit(x))
    assert not any("ss2d" in k for k in model.state_dict())
