"""Models that return NaN/Inf: failed tiles with their own reason, a named error above 1 % of the
tissue, and the same refusal in evaluation (a corrupt checkpoint must not produce metrics).

The slide is a synthetic H&E slide at 1 µm/px with grid tiles painted in horizontal stripes,
10 px pink (235, 160, 205) and 10 px purple (110, 50, 150), both stain colours, so the tissue
stage keeps them. The WSInfer model returns finite logits except where the green channel's row
means jump from row to row: with Normalize(0.5, 0.25) a stripe edge jumps by
(160 - 50) / 255 / 0.25 = 1.7, about every third of the 32 input rows, a mean jump near 0.5;
the rows of a natural tile average over 32 px of mixed tissue and move by a few hundredths. A
25 px @ 4 µm/px patch is P = 100 level-0 px, so painting level-0 [100 r, 100 r + 100) x
[100 c, 100 c + 100) marks exactly tile (r, c) and no neighbour.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from tests.helpers.slides import write_tiff_slide
from wsi_cmaf.errors import NonFiniteOutputError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.slide.synthetic import write_synthetic_slide

P = 100  # level-0 px per tile: 25 px at 4 µm/px on a 1 µm/px slide
CFG = InferenceConfig(progress=False, overlay=False, geojson=False, batch_size=64, precision="off")


class MarkedTiles(nn.Module):
    """Finite logits, but ``bad`` (NaN or +Inf) for tiles painted in stripes."""

    def __init__(self, bad: float) -> None:
        super().__init__()
        self.bad = bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[:, 1].mean(dim=2)
        jumps = (rows[:, 1:] - rows[:, :-1]).abs().mean(dim=1)
        logits = torch.stack([torch.zeros_like(jumps), x.mean(dim=(1, 2, 3))], dim=1)
        marked = (jumps > 0.3).unsqueeze(1)
        return torch.where(marked, torch.full_like(logits, self.bad), logits)


class AllNaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 2), float("nan"), dtype=x.dtype, device=x.device)


def zoo_folder(root: Path, module: nn.Module) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module.eval()).save(str(root / "torchscript_model.pt"))
    config = {"spec_version": "1.0", "architecture": "marked", "num_classes": 2, "class_names": ["benign", "tumor"],
              "patch_size_pixels": 25, "spacing_um_px": 4.0,
              "transform": [{"name": "Resize", "arguments": {"size": 32}}, {"name": "ToTensor"},
                            {"name": "Normalize", "arguments": {"mean": [0.5] * 3, "std": [0.25] * 3}}]}
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("nonfinite")
    src = write_synthetic_slide(d / "src.tiff", 4000, 3000, 1.0, seed=3, tumour=True).path
    base = tifffile.imread(src, level=0)
    out = {}
    for name, tiles in {"one": [(18, 16)], "nine": [(r, c) for r in (18, 19, 20) for c in (16, 17, 18)]}.items():
        img = base.copy()
        for r, c in tiles:
            tile = img[r * P:(r + 1) * P, c * P:(c + 1) * P]
            tile[:] = (235, 160, 205)
            for y in range(10, P, 20):
                tile[y:y + 10] = (110, 50, 150)
        out[name] = write_tiff_slide(d / f"{name}.tiff", img, mpp=1.0, downsamples=(1, 4, 16), tile=256)
    return out


def test_one_inf_tile_is_a_failed_tile_with_its_own_reason(slides, tmp_path) -> None:
    model = zoo_folder(tmp_path / "inf", MarkedTiles(float("inf")))
    res = analyze_slide(slides["one"], model=model, out=tmp_path / "o", config=CFG)
    store = HeatmapStore.open(res.outputs["store"])
    tissue = store.tissue()
    probs = store.probabilities(0)
    assert tissue[18, 16] and tissue.sum() > 100  # one tile of more than 100: below 1 %
    assert np.isnan(probs[:, 18, 16]).all() and store.failed_tiles[18, 16]
    others = tissue.copy()
    others[18, 16] = False
    assert np.isfinite(probs[:, others]).all() and not store.failed_tiles[others].any()
    assert store.nonfinite_tiles() == 1
    (record,) = [f for f in res.failed_tiles if f["stage"] == "inference"]
    assert (record["row"], record["col"]) == (18, 16) and "non-finite model output" in record["reason"]
    assert record["x"] == 16 * P and record["y"] == 18 * P
    assert any("NaN/Inf" in w for w in res.warnings)


def test_more_than_one_percent_nonfinite_is_a_named_error(slides, tmp_path) -> None:
    model = zoo_folder(tmp_path / "inf9", MarkedTiles(float("inf")))
    with pytest.raises(NonFiniteOutputError, match=r"returned NaN/Inf for 9 of \d+ tissue tiles") as info:
        analyze_slide(slides["nine"], model=model, out=tmp_path / "o", config=InferenceConfig(
            progress=False, overlay=False, geojson=False, batch_size=64))
    assert str(model) in str(info.value) and "--precision off" in str(info.value)
    store = HeatmapStore.open(tmp_path / "o" / "nine.zarr")
    assert store.failed_tiles[18:21, 16:19].all() and store.failed_tiles.sum() == 9


def test_all_nan_model_fails_by_name_not_as_a_benign_slide(slides, tmp_path, capsys) -> None:
    from wsi_cmaf.cli import main

    model = zoo_folder(tmp_path / "nan", AllNaN())
    out = tmp_path / "o"
    rc = main(["analyze", str(slides["one"]), "--model", str(model), "--out", str(out), "--no-overlay",
               "--no-geojson", "--precision", "off", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "NaN/Inf" in err[0] and str(model) in err[0] and "full precision too" in err[0]
    assert not (out / "one_summary.json").exists()  # no summary calls it benign


class Overflows(nn.Module):
    """Logits of about +-1e5: fine in fp32, Inf under fp16 autocast (its largest value is 65,504)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[3e4, 3e4, 3e4], [-3e4, -3e4, -3e4]]))
            self.fc.bias.fill_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def test_fp16_overflow_is_refused_and_precision_off_resumes_the_failed_tiles(slides, tmp_path, capsys) -> None:
    from wsi_cmaf.cli import main

    model = zoo_folder(tmp_path / "ovf", Overflows())
    args = ["analyze", str(slides["one"]), "--model", str(model), "--out", str(tmp_path / "o"), "--no-overlay",
            "--no-geojson", "-q", "--precision"]
    assert main(args + ["fp16"]) == 1
    err = capsys.readouterr().err
    assert "returned NaN/Inf for" in err and "rerun with --precision off" in err
    store = HeatmapStore.open(tmp_path / "o" / "one.zarr")
    assert (store.failed_tiles == store.tissue()).all() and store.nonfinite_tiles() == int(store.tissue().sum())
    assert main(args + ["off"]) == 0
    store = HeatmapStore.open(tmp_path / "o" / "one.zarr")
    assert not store.failed_tiles.any() and store.nonfinite_tiles() == 0
    assert np.isfinite(store.probabilities(0)[:, store.tissue()]).all()


def test_runner_flags_rows_with_any_nonfinite_logit_on_the_device() -> None:
    """-Inf in one logit gives a finite softmax ([0, 1]); the row must still come back as NaN."""
    from wsi_cmaf.infer.runner import BatchRunner
    from wsi_cmaf.preprocess import TilePreprocessor

    class MinusInf(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first = x[:, 0, 0, 0] > 0  # tiles whose first pixel is brighter than the mean
            return torch.stack([torch.where(first, float("-inf"), 0.0), torch.zeros_like(x[:, 0, 0, 0])], 1)

    tiles = np.zeros((4, 8, 8, 3), np.uint8)
    tiles[1, 0, 0] = 255
    tiles[3, 0, 0] = 255
    runner = BatchRunner(MinusInf(), TilePreprocessor(8, (0.5,) * 3, (0.25,) * 3), torch.device("cpu"), 2, "off")
    out = runner(tiles)
    assert np.isnan(out[[1, 3]]).all()
    np.testing.assert_array_equal(out[[0, 2]], [[0.5, 0.5], [0.5, 0.5]])


def test_predict_refuses_nonfinite_outputs_by_name() -> None:
    from wsi_cmaf.train.evaluate.predict import predict

    class SomeNaN(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.where(x[:, :1] > 0.5, float("nan"), torch.cat([x[:, :1], -x[:, :1]], 1))

    x = torch.tensor([[0.1], [0.9], [0.2], [0.3]])
    loader = [(x[:2], torch.tensor([0, 1]), torch.tensor([0, 1])), (x[2:], torch.tensor([0, 0]), torch.tensor([2, 3]))]
    message = r"'net-a' returned NaN/Inf for 1 of 4 samples \(dataset indices 1\)"
    with pytest.raises(NonFiniteOutputError, match=message):
        predict(SomeNaN(), loader, lambda b, i: b, torch.device("cpu"), name="net-a")
    probs, _, _ = predict(SomeNaN(), loader[1:], lambda b, i: b, torch.device("cpu"))
    assert np.isfinite(probs).all() and probs.shape == (2, 2)


def test_evaluate_of_a_corrupt_checkpoint_is_a_named_error(tmp_path, capsys) -> None:
    """A checkpoint whose classifier weights are NaN (a diverged run, a damaged file)."""
    import pandas as pd
    from PIL import Image

    from wsi_cmaf.cli import main
    from wsi_cmaf.models import ModelConfig, create_model, save_model

    mc = ModelConfig(architecture="timm:resnet18", num_classes=2, class_names=["benign", "malignant"],
                     input_size=32, stain_normalization=None, weights_note="test model")
    net = create_model("timm:resnet18", num_classes=2).eval()
    with torch.no_grad():
        net.get_classifier().weight.fill_(float("nan"))
    model_dir = save_model(net, mc, tmp_path / "m")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(tmp_path / f"p{k}.png")
        rows.append({"path": f"p{k}.png", "label": k % 2, "patient_id": f"pt{k}", "split": "test"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    rc = main(["evaluate", "--checkpoint", str(model_dir), "--manifest", str(tmp_path / "m.csv"), "--out",
               str(tmp_path / "eval"), "--device", "cpu", "--bootstrap", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "returned NaN/Inf for 4 of 4 samples" in err and str(model_dir) in err
    assert not (tmp_path / "eval" / "metrics.json").exists()
