"""Model configs outside any sane range are named config errors before any model or slide work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from wsi_cmaf.errors import ImplausibleModelConfigError, ImplausibleValueError, ModelConfigError
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.models.config import ModelConfig


class MustNotRun(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the model ran: the config was not checked first")


def zoo(root: Path, size: int, patch: int = 224, spacing: float = 0.5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.jit.script(MustNotRun()).save(str(root / "torchscript_model.pt"))
    (root / "config.json").write_text(json.dumps({
        "spec_version": "1.0", "architecture": "resnet34", "num_classes": 2, "class_names": ["a", "b"],
        "patch_size_pixels": patch, "spacing_um_px": spacing,
        "transform": [{"name": "Resize", "arguments": {"size": size}}, {"name": "ToTensor"},
                      {"name": "Normalize", "arguments": {"mean": [0.5] * 3, "std": [0.25] * 3}}]}))
    return root


def test_wsinfer_resize_to_200000_px_is_refused_by_name_before_the_model_runs(tmp_path) -> None:
    with pytest.raises(ImplausibleModelConfigError, match=r"input_size 200000 px is larger than 4096 px "
                                                          r"\(480\.0 GB of float input per tile\)") as info:
        resolve_model(zoo(tmp_path / "z", 200_000))
    assert str(tmp_path / "z") in str(info.value)
    assert isinstance(info.value, ModelConfigError) and isinstance(info.value, ImplausibleValueError)


@pytest.mark.parametrize("kwargs, message", [
    ({"input_size": 4097}, "input_size 4097 px is larger than 4096 px"),
    ({"input_size": 20_000}, "(4.8 GB of float input per tile)"),
    ({"patch_size_pixels": 8193, "spacing_um_px": 0.25}, "patch_size_pixels 8193 is larger than 8192 px"),
    # 4,096 px at 4 µm/px is 16.384 mm: wider than 10 mm
    ({"patch_size_pixels": 4096, "spacing_um_px": 4.0}, "is 16.384 mm wide, more than 10 mm"),
    ({"spacing_um_px": 1000.0}, "spacing_um_px 1000.0 is outside 0.01-100 µm/px"),
    ({"spacing_um_px": math.inf}, "spacing_um_px inf is outside"),
    ({"spacing_um_px": 0.001}, "spacing_um_px 0.001 is outside"),
])
def test_out_of_range_values_are_named(kwargs, message) -> None:
    with pytest.raises(ImplausibleModelConfigError) as info:
        ModelConfig(**kwargs)
    assert message in str(info.value)


def test_the_ranges_keep_their_edges() -> None:
    ModelConfig(input_size=4096, patch_size_pixels=8192, spacing_um_px=1.0)  # 8.192 mm: inside
    ModelConfig(spacing_um_px=100.0, patch_size_pixels=100)  # 10 mm exactly
    ModelConfig(spacing_um_px=0.01)


def test_non_positive_and_negative_values_stay_config_errors() -> None:
    with pytest.raises(ModelConfigError, match="spacing_um_px must be > 0"):
        ModelConfig(spacing_um_px=0.0)
    with pytest.raises(ModelConfigError, match="patch_size_pixels must be an int >= 8"):
        ModelConfig(patch_size_pixels=-50)
    with pytest.raises(ModelConfigError, match="spacing_um_px must be > 0"):
        ModelConfig(spacing_um_px=math.nan)


def test_cli_refuses_it_as_a_usage_error_before_any_output(tmp_path, capsys) -> None:
    from wsi_cmaf.cli import main
    from wsi_cmaf.slide import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.svs", width=512, height=512, mpp=1.0, tile=256).path
    model = zoo(tmp_path / "z", 20_000)
    assert main(["analyze", str(slide), "--model", str(model), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input_size 20000 px is larger than 4096 px" in err[0]
    assert not (tmp_path / "o").exists()
