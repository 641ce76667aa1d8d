"""WSInfer-style models for tests: a tiny conv net, a model-zoo folder around any net, and one
level-0 analysis of a synthetic slide by such a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TinyNet(nn.Module):
    """A small conv net: fast on 2 CPU cores, still sensitive to every input pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def zoo_folder(root: Path, net: nn.Module, patch_px: int, spacing: float, input_size: int) -> Path:
    """A WSInfer model-zoo folder under ``root``: ``net`` traced to TorchScript and a config of
    ``patch_px`` px at ``spacing`` µm/px, resized to ``input_size`` and ImageNet-normalised."""
    folder = root / "zoo"
    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        traced = torch.jit.trace(net.eval(), torch.zeros(1, 3, input_size, input_size))
        traced.save(str(folder / "torchscript_model.pt"))
    config = {"spec_version": "1.0", "architecture": "test", "num_classes": 2, "class_names": ["a", "b"],
              "patch_size_pixels": patch_px, "spacing_um_px": spacing,
              "transform": [{"name": "Resize", "arguments": {"size": input_size}}, {"name": "ToTensor"},
                            {"name": "Normalize", "arguments": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}]}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def analyze_on_lattice(tmp_path: Path, width: int, height: int) -> tuple[Path, Path, Any, Path]:
    """A 0.499 µm/px synthetic slide analysed in level-0 mode by a 50 px @ 4 µm/px zoo model.

    Returns the slide, the model folder, the run's InferenceConfig and the store's path.
    """
    from wsi_cmaf.infer.config import InferenceConfig
    from wsi_cmaf.infer.pipeline import analyze_slide
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    slide = tmp_path / "s.tiff"
    write_synthetic_slide(slide, width, height, 0.499, seed=3, tumour=True)
    torch.manual_seed(0)
    folder = zoo_folder(tmp_path, TinyNet(), 50, 4.0, 64)
    run = InferenceConfig(batch_size=16, overlay=False, geojson=False, progress=False, precision="off")
    analyze_slide(slide, model=folder, out=tmp_path / "out", config=run)
    return slide, folder, run, tmp_path / "out" / "s.zarr"
