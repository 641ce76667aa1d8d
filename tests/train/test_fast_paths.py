"""Sync-free training pieces give the numbers of the code they replace; the ``compile`` setting.

* foreach adaptive gradient clipping == timm's per-parameter ``adaptive_clip_grad``;
* the HSIC bandwidth median without a boolean-mask gather == the old ``sq[~eye]`` median;
* ``compile``: "auto" stays eager on CPU; compiling keeps the ``state_dict`` keys.
"""

from __future__ import annotations

import pytest
import torch
from timm.utils import adaptive_clip_grad
from torch import nn

from tests.helpers.train import TINY, tiny_config
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.models import create_model, load_model
from wsi_cmaf.models.bottleneck import _gaussian_gram
from wsi_cmaf.train.config import TrainConfig
from wsi_cmaf.train.engine.clipping import AdaptiveGradClip
from wsi_cmaf.train.engine.sam import nonfinite_flag
from wsi_cmaf.train.engine.stages import BranchHeads, compile_for_training, compile_mode
from wsi_cmaf.train.engine.trainer import train

SHAPES = [(6, 3, 3, 3), (4, 6), (4,), (1,), (), (5, 2, 7)]


def _params(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES):
        p = nn.Parameter(torch.randn(shape, generator=g))
        # gradient magnitudes from 1e-4 to 10: some units below the clip threshold, some above
        p.grad = torch.randn(shape, generator=g) * 10.0 ** (i % 6 - 4)
        params.append(p)
    return params


@pytest.mark.parametrize("clip", [0.01, 0.1])
def test_foreach_agc_equals_timm(clip: float) -> None:
    ours, ref = _params(0), _params(0)
    before = [p.grad.clone() for p in ours]
    AdaptiveGradClip(ours, clip)()
    adaptive_clip_grad(ref, clip_factor=clip)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    changed = [not torch.equal(g, p.grad) for g, p in zip(before, ours)]
    assert any(changed) and not all(changed)  # the comparison covers clipped and untouched units


def test_foreach_agc_skips_parameters_without_gradient() -> None:
    params = _params(1)
    params[2].grad = None
    ref = _params(1)
    ref[2].grad = None
    clipper = AdaptiveGradClip(params, 0.01)
    clipper()
    clipper()  # cached layout reused
    adaptive_clip_grad(ref, clip_factor=0.01)
    adaptive_clip_grad(ref, clip_factor=0.01)
    for a, b in zip(params, ref):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


def test_nonfinite_flag() -> None:
    params = _params(2)
    assert float(nonfinite_flag(params)) == 0.0
    params[3].grad[0] = float("inf")
    assert float(nonfinite_flag(params)) == 1.0
    params[3].grad[0] = float("nan")
    assert float(nonfinite_flag(params)) == 1.0


@pytest.mark.parametrize("n", [3, 4, 7, 16, 33])
def test_hsic_bandwidth_median_is_unchanged(n: int) -> None:
    x = torch.randn(n, 9, generator=torch.Generator().manual_seed(n))
    sq = torch.cdist(x, x).pow(2)
    old_sigma2 = sq[~torch.eye(n, dtype=torch.bool)].median().clamp_min(1e-6)  # the formula it replaces
    assert torch.equal(_gaussian_gram(x), torch.exp(-sq / (2.0 * old_sigma2)))


def test_compile_modes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode("auto", cpu) is None  # eager on CPU unless asked
    assert compile_mode("auto", cuda) == "default"
    assert compile_mode("off", cuda) is None
    assert compile_mode("on", cpu) == "default"
    assert compile_mode("max-autotune", cuda) == "max-autotune"


def test_compile_config_values(tmp_path) -> None:
    cfg = tiny_config(tmp_path / "x", tmp_path / "syn")
    del cfg["compile"]
    assert TrainConfig.from_dict(cfg).compile == "auto"  # the default
    for bad in ("fast", "reduce-overhead"):
        with pytest.raises(ConfigError, match="compile must be one of"):
            TrainConfig.from_dict({**cfg, "compile": bad})


def test_compiling_keeps_checkpoint_keys_and_outputs() -> None:
    torch.manual_seed(0)
    model = create_model("cmaf_net", num_classes=2, input_size=32, **TINY).eval()
    heads = BranchHeads(model, 2)
    keys, head_keys = list(model.state_dict()), list(heads.state_dict())
    compile_for_training(model, heads, "default", backend="eager")  # lazy: traced at the first call
    assert model._compiled_call_impl is not None and heads._compiled_call_impl is not None
    assert hasattr(model.forward_with_aux, "_torchdynamo_orig_callable")
    assert list(model.state_dict()) == keys and list(heads.state_dict()) == head_keys  # no _orig_mod.
    # an eager run's checkpoint loads strictly into the compiled model, and the other way round
    fresh = create_model("cmaf_net", num_classes=2, input_size=32, **TINY)
    model.load_state_dict(fresh.state_dict(), strict=True)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    try:
        with torch.no_grad():
            fresh.eval()
            torch.testing.assert_close(model(x), fresh(x), rtol=1e-5, atol=1e-6)  # traced by dynamo
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor compilation of a training run; needs a GPU")
def test_cuda_training_run_compiles_by_default(tmp_path) -> None:
    """compile: auto on CUDA compiles stage 1 (branch heads) and stage 2 (forward_with_aux); ~1-2 min."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_config(tmp_path / "run", tmp_path / "syn", compile="auto", device="cuda",
                      stages={"epochs": [1, 1, 0]})
    try:
        result = train(TrainConfig.from_dict(cfg))
        assert counters["stats"]["unique_graphs"] > 0
    finally:
        torch._dynamo.reset()
    assert [r["steps"] for r in result.history] == [3, 3]
    model, _ = load_model(result.model_dir)  # exported keys fit an eager model
    assert not any("_orig_mod" in k for k in model.state_dict())
