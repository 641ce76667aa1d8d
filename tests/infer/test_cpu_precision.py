"""CPU execution speed-ups that must not change results (issue 18, item 4).

* ``precision="auto"`` on CPU: bf16 only where the CPU computes bf16 natively (AMX / AVX512-BF16),
  fp32 elsewhere; with bf16, probabilities stay within 0.01 of fp32 on the demo (default) model
  and on a TorchScript ResNet.
* TorchScript models are frozen + ``optimize_for_inference``d: outputs within 1e-5 of the module as loaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_cmaf import device as device_mod
from wsi_cmaf.device import autocast_dtype, cpu_has_native_bf16
from wsi_cmaf.infer.runner import BatchRunner
from wsi_cmaf.models import optimize as optimize_mod
from wsi_cmaf.models.optimize import prepare_for_inference
from wsi_cmaf.preprocess import TilePreprocessor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = torch.device("cpu")
NATIVE = cpu_has_native_bf16()
needs_native_bf16 = pytest.mark.skipif(
    not NATIVE, reason=f"this CPU has no native bf16 (capability {torch.backends.cpu.get_cpu_capability()}, "
                       "no amx_bf16/avx512_bf16 flag): 'auto' keeps fp32 here, nothing to compare")


@pytest.fixture
def fresh_detection():
    """Clear the cached detection before and after, so monkeypatched answers do not leak."""
    cpu_has_native_bf16.cache_clear()
    yield
    cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(("capability", "flags", "native"), [
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, True),       # Sapphire Rapids
    ("AVX512", {"avx512f", "avx512_bf16"}, True),                 # Cooper Lake, Zen 4
    ("AVX512", {"avx512f", "avx512bw"}, False),                   # Skylake-X: bf16 emulated
    ("AVX2", {"avx2", "avx512_bf16", "amx_bf16"}, False),         # ATEN_CPU_CAPABILITY=avx2 forced
    ("DEFAULT", set(), False),                                    # unknown CPU
])
def test_native_bf16_detection(monkeypatch, fresh_detection, capability, flags, native) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(device_mod, "cpu_flags", lambda: frozenset(flags))
    assert cpu_has_native_bf16() is native
    assert autocast_dtype(CPU, "auto") == (torch.bfloat16 if native else None)
    # explicit choices are never second-guessed
    assert autocast_dtype(CPU, "off") is None and autocast_dtype(CPU, "bf16") == torch.bfloat16


def test_cpu_flags_read_this_machine() -> None:
    flags = device_mod.cpu_flags()
    assert isinstance(flags, frozenset)
    print(f"capability={torch.backends.cpu.get_cpu_capability()} "
          f"bf16 flags={sorted(flags & device_mod.NATIVE_BF16_FLAGS)} native={NATIVE}")


def _resnet18_script(input_size: int) -> torch.jit.ScriptModule:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    with torch.inference_mode():
        return torch.jit.trace(net, torch.zeros(1, 3, input_size, input_size))


def _tiles(n: int, size: int = 50) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("native", [False, True])
def test_torchscript_is_frozen_with_same_outputs(monkeypatch, fresh_detection, native) -> None:
    """Frozen (+ optimize_for_inference where fp32 is the default): outputs within 1e-5."""
    monkeypatch.setattr(optimize_mod, "cpu_has_native_bf16", lambda: native)
    scripted = _resnet18_script(64)
    prepared = prepare_for_inference(scripted, CPU, compile="off")
    assert isinstance(prepared, torch.jit.ScriptModule) and prepared is not scripted and not prepared.training
    graph = str(prepared.graph)
    assert "prim::GetAttr" not in graph  # frozen: weights are constants of the graph, not attributes
    # optimize_for_inference pre-packs convolutions for oneDNN (which autocast cannot reach):
    # only where the default precision is fp32
    assert ("to_mkldnn" in graph) is (not native)
    x = torch.randn(16, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), scripted(x), rtol=0, atol=1e-5)
    assert hasattr(scripted, "conv1") and "prim::GetAttr" in str(scripted.graph)  # the caller's module is untouched


@needs_native_bf16
def test_torchscript_resnet_bf16_within_001_of_fp32() -> None:
    scripted = _resnet18_script(64)
    pre = TilePreprocessor(64, MEAN, STD, "pil_bilinear")
    tiles = _tiles(128)
    fp32 = BatchRunner(scripted, pre, CPU, 64, "off", compile="off")(tiles)
    auto = BatchRunner(scripted, pre, CPU, 64, "auto", compile="off")
    assert auto.dtype == torch.bfloat16
    diff = np.abs(auto(tiles) - fp32)
    print(f"TorchScript ResNet-18 64 px: bf16 vs fp32 max {diff.max():.5f} mean {diff.mean():.6f}")
    assert diff.max() <= 0.01


@needs_native_bf16
def test_demo_model_bf16_within_001_of_fp32(tmp_path) -> None:
    from wsi_cmaf.infer import InferenceConfig, analyze_slide
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    slide = tmp_path / "slide.tiff"
    write_synthetic_slide(slide, 16_000, 12_000, 0.25, seed=7, tumour=True)  # 800 px tiles: ~80 on tissue
    probs = {}
    for mode in ("off", "auto"):
        cfg = InferenceConfig(device="cpu", batch_size=64, progress=False, precision=mode, overlay=False,
                              geojson=False)
        res = analyze_slide(slide, out=tmp_path / mode, overwrite=True, config=cfg)
        tiles = res.tiles()
        probs[mode] = tiles[[c for c in tiles.columns if c.startswith("prob_")]].to_numpy()
    assert len(probs["off"]) > 50 and probs["off"].shape == probs["auto"].shape
    diff = np.abs(probs["auto"] - probs["off"])
    print(f"demo model ({len(diff)} tiles): bf16 vs fp32 max {diff.max():.5f} mean {diff.mean():.6f}")
    assert diff.max() <= 0.01
