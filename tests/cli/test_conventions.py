"""CLI conventions (issue 14): global flags on either side of the verb, exit codes, cheap checks
before the model loads, progress bars only on a terminal; summary provenance and the tile table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cli import build_parser, exit_code, main
from wsi_cmaf.errors import DeviceUnavailableError, OutputNotADirectoryError, SlideNotFoundError, UnreadableSlideError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.slide.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("cli") / "s.tiff", 3200, 2400, 0.5, seed=5, tumour=True)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model would load (the checks must come first)."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr("wsi_cmaf.infer.pipeline.resolve_model", boom)


@pytest.mark.parametrize("argv", [["-q", "info", "x"], ["info", "x", "-q"], ["info", "-q", "x"]])
def test_quiet_before_or_after_the_verb(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.debug is False


def test_verbose_and_debug_either_side():
    args = build_parser().parse_args(["-v", "analyze", "s.svs", "--debug"])
    assert args.verbose == 1 and args.debug is True and args.quiet is False
    assert build_parser().parse_args(["analyze", "s.svs"]).verbose == 0


def test_exit_codes_split_usage_from_runtime():
    assert exit_code(SlideNotFoundError("x.svs", "no such file")) == 2
    assert exit_code(DeviceUnavailableError("no cuda")) == 2
    assert exit_code(OutputNotADirectoryError("a file")) == 2
    assert exit_code(UnreadableSlideError("x.svs", "corrupt")) == 1


def test_missing_slide_fails_before_the_model_and_outputs(tmp_path, no_model, capsys):
    out = tmp_path / "o"
    assert main(["analyze", str(tmp_path / "nope.svs"), "--out", str(out)]) == 2
    assert "nope.svs" in capsys.readouterr().err and not out.exists()


def test_out_that_is_a_file_is_a_named_error(slide, tmp_path, no_model, capsys):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    with pytest.raises(OutputNotADirectoryError, match="is a file"):
        analyze_slide(slide.path, out=out)
    assert main(["analyze", str(slide.path), "--out", str(out / "sub")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is available")
def test_unavailable_device_is_a_named_error_before_any_output(slide, tmp_path, no_model, capsys):
    out = tmp_path / "o"
    assert main(["analyze", str(slide.path), "--out", str(out), "--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err and not out.exists()
    with pytest.raises(DeviceUnavailableError):
        analyze_slide(slide.path, out=out, device="cuda:0")
    assert not out.exists()


def test_quiet_analyze_prints_nothing(slide, tmp_path, monkeypatch, capsys):
    calls = {}

    class Result:
        def summary_lines(self):
            return ["summary"]

    def fake_analyze(path, **kw):
        calls.update(kw)
        return Result()

    monkeypatch.setattr("wsi_cmaf.infer.analyze_slide", fake_analyze)
    assert main(["-q", "analyze", str(slide.path), "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out == "" and calls["config"].progress is False
    assert main(["analyze", str(slide.path), "--out", str(tmp_path / "o")]) == 0
    # pytest's captured stderr is not a terminal: no bar unless asked
    assert capsys.readouterr().out == "summary\n" and calls["config"].progress is False
    assert main(["analyze", str(slide.path), "--progress"]) == 0
    assert calls["config"].progress == "always" and calls["config"].extra == {}


def run(slide_path, out, **kw):
    return analyze_slide(slide_path, model=DarknessClassifier(), model_config=tiny_config(), out=out, **kw)


def test_progress_bar_only_when_asked_off_a_terminal(slide, tmp_path, capsys):
    run(slide.path, tmp_path / "a", config=InferenceConfig(block_tiles=4, progress=True, overlay=False,
                                                           geojson=False))
    assert "tile/s" not in capsys.readouterr().err  # stderr is not a terminal: no bar
    run(slide.path, tmp_path / "b", config=InferenceConfig(block_tiles=4, progress="always", overlay=False,
                                                           geojson=False))
    assert "tile" in capsys.readouterr().err


def test_summary_json_has_provenance_and_absolute_paths(slide, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run(slide.path, Path("rel_out"), config=InferenceConfig(block_tiles=4, progress=False))  # relative --out
    summary = json.loads(res.outputs["summary"].read_text())
    assert Path(summary["slide"]).is_absolute()
    assert all(Path(v).is_absolute() for v in summary["outputs"].values())
    prov = summary["provenance"]
    assert prov["model"]["name"] == res.model_name and prov["slide"]["fingerprint"].startswith("size=")
    assert prov["store"] == str((tmp_path / "rel_out" / "s.zarr").absolute())
    assert "wsi_cmaf.analyze_slide(" in prov["invocation"]["api_call"] and prov["created_utc"].endswith("Z")
    assert {"wsi_cmaf", "torch", "openslide_python", "tiffslide", "zarr"} <= set(prov["software"])
    geo = json.loads(res.outputs["geojson"].read_text())["properties"]["provenance"]
    assert geo["slide"]["fingerprint"] == prov["slide"]["fingerprint"] and geo["created_utc"] == prov["created_utc"]
    # the tile table of the result: one row per tissue tile
    tiles = res.tiles()
    assert len(tiles) == res.tiles_tissue and {"x", "y", "w", "h", "prob_malignant"} <= set(tiles.columns)
    assert tiles["tissue_fraction"].between(0.5, 1.0).all()  # tissue tiles pass the 0.5 threshold


def test_mpp_is_the_slide_override_in_every_verb(tmp_path, capsys):
    """``--mpp`` sets the slide's level-0 µm/px (``--tile-mpp`` the tile spacing), and a slide
    without a resolution gets the advice of the verb that ran."""
    import numpy as np
    import tifffile

    plain = tmp_path / "plain.tiff"  # no resolution tags, no vendor metadata
    tifffile.imwrite(plain, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    assert main(["tiles", str(plain), "--mpp", "0.5", "--tile-mpp", "8", "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "level-0 0.5 µm/px, override" in out and "2 x 2 tiles of 16 px at 8 µm/px" in out  # 512*0.5/8/16 = 2
    assert main(["tiles", str(plain)]) == 1
    err = capsys.readouterr().err
    assert "no µm/px resolution found" in err and "--mpp (e.g. --mpp 0.25)" in err and "mpp=" not in err

    from wsi_cmaf.cli import batch, error_text
    from wsi_cmaf.errors import MissingResolutionError

    exc = MissingResolutionError(plain, "no µm/px resolution found")
    assert "mpp= override" in str(exc)  # the Python advice, outside the command line
    args = build_parser().parse_args(["batch", str(plain), "--out", str(tmp_path / "b")])
    assert args._run is batch.run and error_text(exc, args) == f"{plain}: no µm/px resolution found; {batch.MPP_HINT}"
    assert "mpp column" in batch.MPP_HINT


def test_store_exports_are_sub_verbs_of_export():
    for old in ("geojson", "overlay"):  # no top-level verbs beside the group
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([old, "s.zarr"])
        assert exc.value.code == 2
    for what in ("regions", "tiles", "overlay"):
        args = build_parser().parse_args(["export", what, "s.zarr", "-q"])
        assert args.what == what and args._export.__name__ == f"_{what}" and args.quiet is True
