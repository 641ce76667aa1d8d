"""WSInfer model-zoo folders: config translation, level-0 pixels identical to WSInfer's, argument merging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.wsinfer import TinyNet
from wsi_cmaf.errors import ConfigError, ModelError
from wsi_cmaf.infer.callargs import merge_run_config
from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.modelspec import quick_weights_sha256, resolve_model
from wsi_cmaf.models.config import ModelConfig
from wsi_cmaf.models.wsinfer import (
    UnsupportedTransformError,
    WSInferConfigError,
    model_config_from_dict,
    translate_wsinfer_config,
)
from wsi_cmaf.preprocess import TilePreprocessor
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reader import open_slide
from wsi_cmaf.slide.reads import read_block, read_tile
from wsi_cmaf.slide.synthetic import write_synthetic_slide

MEAN, STD = [0.7, 0.6, 0.75], [0.15, 0.2, 0.12]
#: Allowed |wsi-cmaf input - WSInfer input| in grey levels (0-255), before Normalize. WSInfer's
#: PIL resize rounds to uint8 with fixed-point weights; wsi-cmaf's "pil_bilinear" does the same with
#: torch's uint8 kernel. Measured: max 1 level, mean 0.006 (64 px) / 0.0005 (224 px); float bilinear: mean 0.27.
GREY_MAX, GREY_MEAN = 1.0 + 1e-3, 0.05
PROB_TOL = 0.005  # the bound on probabilities


def wsinfer_config(size: int, **extra) -> dict:
    return {"spec_version": "1.0", "architecture": "tinynet", "num_classes": 2,
            "class_names": ["notumor", "tumor"], "patch_size_pixels": 50, "spacing_um_px": 4.0,
            "transform": [{"name": "Resize", "arguments": {"size": size}}, {"name": "ToTensor"},
                          {"name": "Normalize", "arguments": {"mean": MEAN, "std": STD}}], **extra}


def make_zoo_folder(root: Path, size: int) -> Path:
    torch.manual_seed(0)
    folder = root / f"zoo{size}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(TinyNet().eval()).save(str(folder / "torchscript_model.pt"))
    (folder / "config.json").write_text(json.dumps(wsinfer_config(size)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    # 1 µm/px: a 50 px @ 4 µm/px patch is a 200 px level-0 region, as in the issue
    path = tmp_path_factory.mktemp("wsinfer") / "s.tiff"
    write_synthetic_slide(path, 2400, 1600, 1.0, seed=5, tumour=True)
    return path


def test_translation_is_faithful_and_recorded() -> None:
    cfg = model_config_from_dict(wsinfer_config(64))
    assert (cfg.input_size, cfg.resize_interpolation, cfg.stain_normalization) == (64, "pil_bilinear", None)
    assert cfg.mean == tuple(MEAN) and cfg.std == tuple(STD)
    assert (cfg.patch_source, cfg.patch_size_pixels, cfg.spacing_um_px) == ("level0", 50, 4.0)
    assert cfg.translated_from["format"] == "wsinfer" and cfg.translated_from["translation"]
    assert "untrained" not in cfg.weights_note
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # the translated config round-trips


def test_resize_after_totensor_is_float_bilinear() -> None:
    data = wsinfer_config(64)
    data["transform"] = [data["transform"][1], data["transform"][0], data["transform"][2]]
    assert model_config_from_dict(data).resize_interpolation == "bilinear"


def test_pil_bilinear_float_fallback_matches_uint8_kernel() -> None:
    """The non-CPU path (float matrices + rounding) gives the CPU uint8 kernel's pixels."""
    pre = TilePreprocessor(64, tuple(MEAN), tuple(STD), "pil_bilinear")
    tiles = torch.randint(0, 256, (4, 200, 200, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = pre._pil_bilinear(tiles, uint8_kernel=True), pre._pil_bilinear(tiles, uint8_kernel=False)
    # random noise is the worst case for rounding ties (measured mean ~0.2 level)
    assert (a - b).abs().max() <= 1.0 and (a - b).abs().mean() < 0.3


def test_saved_configs_name_every_field() -> None:
    saved = ModelConfig().to_dict()
    assert saved["patch_source"] == "pyramid" and saved["translated_from"] is None
    assert ModelConfig.from_dict(saved) == ModelConfig()


@pytest.mark.parametrize("step,match", [
    ({"name": "CenterCrop", "arguments": {"size": 50}},
     r"'CenterCrop' is not supported; supported transforms: \['Resize', 'ToTensor', 'Normalize'\]"),
    ({"name": "Resize", "arguments": {"size": 64, "interpolation": "bicubic"}}, "only bilinear"),
])
def test_unknown_transforms_are_refused(step, match) -> None:
    data = wsinfer_config(64)
    data["transform"] = [step] + data["transform"][1:]
    with pytest.raises(UnsupportedTransformError, match=match):
        model_config_from_dict(data)


def test_schema_is_validated() -> None:
    with pytest.raises(WSInferConfigError, match=r"unknown field\(s\) \['colour'\]"):
        translate_wsinfer_config(wsinfer_config(64, colour="red"))
    with pytest.raises(WSInferConfigError, match="spec_version '2.0'"):
        translate_wsinfer_config(wsinfer_config(64, spec_version="2.0"))
    bad = wsinfer_config(64)
    del bad["class_names"]
    with pytest.raises(WSInferConfigError, match=r"missing field\(s\) \['class_names'\]"):
        translate_wsinfer_config(bad)


def test_zoo_folder_resolves(tmp_path) -> None:
    folder = make_zoo_folder(tmp_path, 64)
    resolved = resolve_model(folder)
    assert not resolved.untrained and resolved.config.patch_source == "level0"
    assert "torchscript_model.pt" in resolved.note
    assert resolved.weights_sha256 == quick_weights_sha256(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(wsinfer_config(64)), encoding="utf-8")
    with pytest.raises(ModelError, match="torchscript_model.pt"):
        resolve_model(empty)


def test_missing_weights_note_is_not_untrained(tmp_path) -> None:
    ts = tmp_path / "net.pt"
    torch.jit.script(TinyNet().eval()).save(str(ts))
    cfg = ModelConfig(architecture="tinynet", input_size=32).to_dict()
    del cfg["weights_note"]
    ts.with_suffix(".json").write_text(json.dumps(cfg), encoding="utf-8")
    resolved = resolve_model(ts)
    assert resolved.note == "weights from net.pt, note not given" and not resolved.untrained


def wsinfer_reference(reader, x: int, y: int, size0: int, input_size: int) -> torch.Tensor:
    """WSInfer's pipeline for one patch: PIL level-0 region -> RGB -> Resize -> ToTensor -> Normalize."""
    from PIL import Image
    from torchvision import transforms

    region = Image.fromarray(np.asarray(reader.read_region((x, y), 0, (size0, size0)))).convert("RGB")
    tf = transforms.Compose([transforms.Resize(input_size), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    return tf(region)


def check_same_pixels(path: Path, input_size: int, n_max: int = 24) -> None:
    cfg = model_config_from_dict(wsinfer_config(input_size))
    with open_slide(path) as reader:
        gcfg = GridConfig(mpp=cfg.spacing_um_px, tile_size=cfg.patch_size_pixels, source="level0", block_tiles=4)
        grid = TileGrid.from_slide(reader, gcfg)
        assert grid.level == 0
        block = grid.blocks[len(grid.blocks) // 2]
        item = read_block(reader, grid, block)
        size0 = round(50 * 4.0 / reader.mpp[0])
        assert item.tiles.shape[1:] == (size0, size0, 3)
        pre = TilePreprocessor(cfg.input_size, cfg.mean, cfg.std, cfg.resize_interpolation)
        ours = pre(torch.from_numpy(item.tiles[:n_max]))
        ref = torch.stack([wsinfer_reference(reader, *grid.tile_location(r, c), size0, input_size)
                           for r, c in zip(item.rows[:n_max], item.cols[:n_max])])
        np.testing.assert_array_equal(read_tile(reader, grid, int(item.rows[0]), int(item.cols[0])), item.tiles[0])
    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255.0  # normalised units -> grey levels
    diff = ((ours - ref) * scale).abs()
    print(f"{path.name} @ {input_size} px: |input diff| max {diff.max():.3f}, mean {diff.mean():.3f} grey levels")
    assert diff.max() <= GREY_MAX and diff.mean() <= GREY_MEAN
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.inference_mode():
        p_ours, p_ref = (torch.softmax(net(t), 1) for t in (ours, ref))
    assert (p_ours - p_ref).abs().max() <= PROB_TOL


@pytest.mark.parametrize("input_size", [64, 224])
def test_level0_pixels_match_wsinfer_synthetic(slide, input_size) -> None:
    check_same_pixels(slide, input_size)


def test_level0_pixels_match_wsinfer_real_slide() -> None:
    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "slides" / "cmu_small_region.svs"
    if not path.is_file():
        print(f"skipped: {path} not present")
        pytest.skip(f"{path} not present")
    check_same_pixels(path, 224, n_max=8)


def test_analyze_slide_runs_a_zoo_folder(slide, tmp_path) -> None:
    import zarr

    from wsi_cmaf.infer.pipeline import analyze_slide

    folder = make_zoo_folder(tmp_path, 64)
    result = analyze_slide(slide, model=folder, out=tmp_path / "out", progress=False,
                           config=InferenceConfig(batch_size=8, overlay=False, geojson=False, progress=True))
    assert "untrained" not in result.summary_lines()[0].lower() if hasattr(result, "summary_lines") else True
    attrs = dict(zarr.open_group(str(tmp_path / "out" / "s.zarr"), mode="r").attrs)
    text = json.dumps(attrs)
    assert '"patch_source": "level0"' in text and '"source": "level0"' in text
    assert '"batch_size": 8' in text and '"progress": false' in text  # explicit progress= overrode config


def test_explicit_arguments_override_config() -> None:
    base = InferenceConfig(batch_size=8, device="cpu", stain="macenko", progress=False)
    merged = merge_run_config(base, {"batch_size": 4, "stain": "none"})
    assert (merged.batch_size, merged.stain, merged.device, merged.progress) == (4, "none", "cpu", False)
    assert merge_run_config(base, {}) is base
    plain = merge_run_config(None, {"stain": None})
    assert (plain.batch_size, plain.stain) == (256, None)
    # any field can be overridden, not only a chosen few
    assert merge_run_config(base, {"block_tiles": 8, "precision": "off"}).block_tiles == 8
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['batchsize'\]; valid fields: .*'batch_size'"):
        merge_run_config(base, {"batchsize": 4})


def test_both_entry_points_check_overrides_before_any_work(tmp_path) -> None:
    from wsi_cmaf import InferenceConfig as TopLevel
    from wsi_cmaf import analyze_slide, analyze_slides

    assert TopLevel is InferenceConfig
    for call in (lambda: analyze_slide(tmp_path / "missing.svs", None, tmp_path / "o", batchsize=4),
                 lambda: analyze_slides([tmp_path / "missing.svs"], tmp_path / "b", None, batchsize=4)):
        with pytest.raises(ConfigError, match=r"keyword argument\(s\): unknown field\(s\) \['batchsize'\]"):
            call()
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_torchscript_batches_are_padded_to_few_shapes() -> None:
    """TorchScript re-optimises per input shape: the runner pads its batches (outputs unchanged)."""
    from wsi_cmaf.infer.runner import BatchRunner

    torch.manual_seed(0)
    eager = TinyNet().eval()
    scripted = torch.jit.script(eager)
    pre = TilePreprocessor(32, tuple(MEAN), tuple(STD), "pil_bilinear")
    runner = BatchRunner(scripted, pre, torch.device("cpu"), 16, "off", compile="off")
    assert runner.fixed_shapes and runner.padded(5) == 8 and runner.padded(16) == 16
    tiles = np.random.default_rng(0).integers(0, 256, (21, 40, 40, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = torch.softmax(eager(pre(torch.from_numpy(tiles))), 1).numpy()
    np.testing.assert_allclose(runner(tiles), expected, atol=1e-5)
    assert not BatchRunner(eager, pre, torch.device("cpu"), 16, "off", compile="off").fixed_shapes
