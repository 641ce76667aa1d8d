"""Every inference fast path computes the eager fp32 model's function, within a stated tolerance.

Tolerances (max abs difference of class probabilities unless said otherwise):
* BatchNorm folding, channels_last, prepare_for_inference(compile="off"): 1e-5 (fp32 reordering).
* cached sin-cos / shared gradient grid: exact (bit-identical).
* Nyström under bf16 autocast (fp32 pseudo-inverse) vs fp32 Nyström: relative L2 error <= 1e-2
  of the attention output (measured 2.7e-3).
* exact attention: equals softmax(q kᵀ/√d) v written out by hand (atol 1e-5).
* torch.compile: a small conv net, 1e-4.
BN statistics are randomised (or trained, for the packaged model) so that folding is exercised.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.models import CMAFConfig, create_model, load_model
from wsi_cmaf.models.contextual import ContextualBlock, GradientPyramid, _sincos_2d, sincos_2d
from wsi_cmaf.models.nystrom import NystromAttention, iterative_pinv, nystrom_attention, use_exact
from wsi_cmaf.models.optimize import COMPILE_MODES, fold_batchnorm, prepare_for_inference, resolve_compile_mode

SMALL = dict(mvit_stem_channels=8, mvit_channels=[16, 16, 24, 24, 32], mvit_dims=[32, 32, 32],
             mvit_depths=[1, 1, 1], context_dim=64, num_heads=4, bottleneck_dim=8, head_hidden=[16],
             nystrom_landmarks=16, spatial_backbone="resnet18")
WEIGHTS = Path(__file__).resolve().parents[2] / "wsi_cmaf" / "models" / "weights" / "default"


def _trained_looking_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (folding must matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).float().softmax(-1)


def _n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def cmaf() -> nn.Module:
    torch.manual_seed(0)
    return _trained_looking_bn(create_model("cmaf_net", **SMALL))


# ----------------------------------------------------------------------------- BN folding
def test_bn_folding_matches_and_leaves_the_callers_model_alone(cmaf):
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in cmaf.state_dict().items()}
    n_bn = _n_bn(cmaf)
    folded = prepare_for_inference(cmaf, "cpu", compile="off", channels_last=False)
    assert n_bn > 30 and _n_bn(folded) == 0  # every BN of both branches is folded
    assert (_probs(folded, x) - _probs(cmaf, x)).abs().max() <= 1e-5
    assert _n_bn(cmaf) == n_bn and all(torch.equal(before[k], v) for k, v in cmaf.state_dict().items())
    # The statistics matter: shifting one BN's mean moves the output, so the test above is not vacuous.
    shifted = _trained_looking_bn(create_model("cmaf_net", **SMALL))
    shifted.load_state_dict(cmaf.state_dict())
    next(m for m in shifted.modules() if isinstance(m, nn.BatchNorm2d)).running_mean.add_(3.0)
    assert (_probs(shifted, x) - _probs(cmaf, x)).abs().max() > 1e-4


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())


def test_channels_last_matches(cmaf):
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(2))
    nchw = prepare_for_inference(cmaf, "cpu", compile="off", channels_last=False)
    nhwc = prepare_for_inference(cmaf, "cpu", compile="off", channels_last=True)
    assert (_probs(nhwc, x.contiguous(memory_format=torch.channels_last)) - _probs(nchw, x)).abs().max() <= 1e-5
    assert (_probs(nhwc, x) - _probs(cmaf, x)).abs().max() <= 1e-5  # NCHW input works too


def test_packaged_model_with_trained_bn_is_unchanged_by_preparation():
    model, _ = load_model(WEIGHTS)
    assert model.config.attention == "nystrom"  # saved before the field existed: keeps Nyström
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    fast = prepare_for_inference(model, "cpu", compile="off")
    assert _n_bn(fast) == 0
    assert (_probs(fast, x) - _probs(model.eval(), x)).abs().max() <= 1e-5


def test_prepare_timm_resnet_and_torchscript():
    torch.manual_seed(0)
    net = _trained_looking_bn(timm.create_model("resnet18", pretrained=False, num_classes=3))
    x = torch.randn(2, 3, 64, 64)
    fast = prepare_for_inference(net, "cpu", compile="off")
    assert _n_bn(fast) == 0 and _n_bn(net) == 20
    assert (_probs(fast, x) - _probs(net, x)).abs().max() <= 1e-5
    scripted = torch.jit.trace(net, x)
    same = prepare_for_inference(scripted, "cpu", compile="off")
    assert isinstance(same, torch.jit.ScriptModule) and not same.training
    assert (_probs(same, x) - _probs(net, x)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- cached embeddings
def test_sincos_cache_is_exact_and_reused():
    a = sincos_2d(7, 9, 64, torch.device("cpu"), torch.float32)
    assert torch.equal(a, _sincos_2d(7, 9, 64, torch.device("cpu"), torch.float32))
    assert sincos_2d(7, 9, 64, torch.device("cpu"), torch.float32) is a  # built once
    b = sincos_2d(7, 9, 64, torch.device("cpu"), torch.bfloat16)
    assert b.dtype == torch.bfloat16 and torch.equal(b, a.to(torch.bfloat16))
    with torch.inference_mode():
        c = sincos_2d(5, 5, 30, torch.device("cpu"), torch.float32)
    assert not c.is_inference()  # usable by a later training forward


def test_gradient_grid_is_computed_once_per_size_and_shared(monkeypatch):
    torch.manual_seed(0)
    block = ContextualBlock(16, 32, 1, num_heads=4, num_landmarks=8).eval()
    grads = GradientPyramid()(torch.randn(2, 3, 64, 64))
    x = torch.randn(2, 16, 8, 8)
    calls = []
    real = GradientPyramid.to_grid
    monkeypatch.setattr(GradientPyramid, "to_grid", staticmethod(lambda m, s: calls.append(s) or real(m, s)))
    with torch.inference_mode():
        ref = block(x, grads)
        cache: dict = {}
        first, second = block(x, grads, cache), block(x, grads, cache)
    assert calls == [(8, 8), (8, 8)]  # once without a cache, once for the two cached calls
    assert torch.equal(first, ref) and torch.equal(second, ref)


# ----------------------------------------------------------------------------- attention
def _tokens(n: int = 196, d: int = 16, heads: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, n)[:, None]
    base = torch.sin(2 * math.pi * t * torch.randn(1, d, generator=g) * 3 + torch.rand(1, d, generator=g) * 6)
    q = base + 0.05 * torch.randn(2, heads, n, d, generator=g)
    k = base @ torch.randn(d, d, generator=g) / d**0.5 + 0.05 * torch.randn(2, heads, n, d, generator=g)
    v = torch.randn(2, heads, n, d, generator=g)
    return q, k, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_nystrom_bf16_with_fp32_pinv_matches_fp32():
    q, k, v = _tokens()
    ref = nystrom_attention(q, k, v, 64, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = nystrom_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 64, 6)
        inv = iterative_pinv(torch.softmax(q[..., :64, :] @ k[..., :64, :].transpose(-1, -2), -1).bfloat16())
    assert fast.dtype == torch.bfloat16 and inv.dtype == torch.float32  # pinv always in fp32
    assert _rel(fast, ref) <= 1e-2, _rel(fast, ref)  # measured 2.7e-3


def test_exact_mode_is_softmax_attention_and_auto_switches_by_length():
    torch.manual_seed(0)
    attn = NystromAttention(32, 4, num_landmarks=8, mode="exact").eval()
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 50, 3, 4, 8).permute(2, 0, 3, 1, 4)
        by_hand = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
        expected = attn.proj(by_hand.transpose(1, 2).reshape(2, 50, 32))
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
        nys = NystromAttention(32, 4, num_landmarks=8, mode="nystrom").eval()
        nys.load_state_dict(attn.state_dict())
        assert (nys(x) - expected).abs().max() > 1e-4  # Nyström really approximates here
    assert use_exact("auto", 196, 64, 1024) and not use_exact("auto", 2000, 64, 1024)
    assert not use_exact("nystrom", 196, 64, 1024) and use_exact("nystrom", 64, 64, 0)


def test_attention_field_default():
    assert CMAFConfig().attention == "auto"
    assert CMAFConfig.from_dict({}).attention == "auto"
    assert CMAFConfig.from_dict({"nystrom_landmarks": 32}).attention == "auto"  # an ordinary field
    assert CMAFConfig.from_dict({"nystrom_landmarks": 32, "attention": "exact"}).attention == "exact"
    with pytest.raises(ModelConfigError, match="attention must be one of"):
        CMAFConfig(attention="linear")


# ----------------------------------------------------------------------------- compile
def test_resolve_compile_mode():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile_mode("auto", cpu) is None and resolve_compile_mode("off", cuda) is None
    assert resolve_compile_mode("auto", cuda) == "default"
    assert resolve_compile_mode("auto", cuda, cuda_graph_batch=1) == "reduce-overhead"
    assert resolve_compile_mode("auto", cuda, cuda_graph_batch=256) == "default"
    assert resolve_compile_mode("on", cpu) == "default"
    assert set(COMPILE_MODES) >= {"auto", "off", "on", "reduce-overhead", "max-autotune"}
    with pytest.raises(ValueError):
        prepare_for_inference(nn.Linear(2, 2), "cpu", compile="fast")


def test_compiled_small_convnet_matches_eager():
    torch.manual_seed(0)
    net = _trained_looking_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 2)))
    x = torch.randn(2, 3, 16, 16)
    compiled = prepare_for_inference(net, "cpu", compile="on")
    assert (_probs(compiled, x) - _probs(net, x)).abs().max() <= 1e-4
