"""The slide QC inside ``analyze_slide`` and ``wsi-cmaf qc``: the store's ``qc`` group, the summary,
the tile table and overlay, ``--exclude-blurred``, ``--mpp estimate`` and the JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from wsi_cmaf.cli import main
from wsi_cmaf.errors import StoreMismatchError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.tiles import tile_table
from wsi_cmaf.qc.report import read_store
from wsi_cmaf.slide import open_slide

REPORT_KEYS = {"mpp_metadata", "mpp_estimate", "mpp_estimate_interval", "ink_fraction", "blurred_tiles",
               "tissue_tiles", "warnings"}


def _cmu_copy(src: Path, out: Path, *, blur_sigma: float = 0.0, factor: int = 1, keep_mpp: bool = True) -> float:
    with open_slide(src) as r:
        w, h = r.level_dimensions[0]
        rgb, mpp = r.read_region((0, 0), 0, (w, h)), r.mpp[0]
    if blur_sigma:
        quad = ndi.gaussian_filter(rgb[h // 2:, w // 2:].astype(np.float32), (blur_sigma, blur_sigma, 0))
        rgb = rgb.copy()
        rgb[h // 2:, w // 2:] = np.clip(quad + 0.5, 0, 255).astype(np.uint8)
    if factor > 1:
        rgb = np.asarray(Image.fromarray(rgb).reduce(factor))
    mpp = mpp * w / rgb.shape[1]
    extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if keep_mpp else {}
    tifffile.imwrite(out, rgb, tile=(256, 256), photometric="rgb", compression="zlib", **extra)
    return mpp


@pytest.mark.realdata
def test_analyze_stores_qc_and_excludes_blurred_tiles(real_slide, tmp_path: Path) -> None:
    path = tmp_path / "cmu_blur.tiff"
    _cmu_copy(real_slide("svs"), path, blur_sigma=3.0)
    cfg = InferenceConfig(progress=False, overlay=True, geojson=False)
    res = analyze_slide(path, out=tmp_path / "a", config=cfg)
    qc = res.qc
    assert set(qc) >= REPORT_KEYS
    assert qc["mpp_metadata"] == pytest.approx([0.499, 0.499], rel=1e-3)
    assert abs(qc["mpp_estimate"] / 0.499 - 1) <= 0.25  # the check ran, and agrees: no warning
    assert not any("disagree" in w or "differ" in w for w in res.warnings)
    summary = json.loads(Path(res.outputs["summary"]).read_text())
    assert summary["qc"] == qc
    store = HeatmapStore.open(res.store)
    stored = read_store(store)
    assert stored["report"] == qc
    blur = stored["blur"].astype(bool)
    tissue = store.tissue(0).astype(bool)
    rows, cols = np.indices(blur.shape)
    (ty, tx) = store.um_per_tile
    w0, h0 = 2220 * 0.499, 2967 * 0.499
    inside = tissue & (cols * tx >= w0 / 2) & (rows * ty >= h0 / 2)
    outside = tissue & (((cols + 1) * tx <= w0 / 2) | ((rows + 1) * ty <= h0 / 2))
    assert inside.sum() >= 3 and blur[inside].mean() >= 0.8
    assert blur[outside].mean() <= 0.05
    assert qc["blurred_tiles"] == int((blur & tissue).sum()) > 0
    table = tile_table(res.store)
    assert table["blurred"].sum() == qc["blurred_tiles"]
    assert Path(res.outputs["overlay"]).is_file()

    excluding = InferenceConfig(progress=False, overlay=False, geojson=False, exclude_blurred=True)
    with pytest.raises(StoreMismatchError, match="exclude_blurred"):  # the first store analysed them all
        analyze_slide(path, out=tmp_path / "a", config=excluding)
    excl = analyze_slide(path, out=tmp_path / "b", config=excluding)
    assert excl.qc["blur_excluded"] and excl.qc["blurred_tiles"] == qc["blurred_tiles"]
    assert excl.tiles_tissue == res.tiles_tissue - qc["blurred_tiles"]
    probs = HeatmapStore.open(excl.store).probabilities(0)
    assert np.isnan(probs[:, blur & tissue]).all()  # not analysed


@pytest.mark.realdata
def test_analyze_with_estimated_mpp(real_slide, tmp_path: Path) -> None:
    path = tmp_path / "cmu_x2.tiff"
    truth = _cmu_copy(real_slide("svs"), path, factor=2, keep_mpp=False)
    res = analyze_slide(path, out=tmp_path / "a", mpp="estimate",
                        config=InferenceConfig(progress=False, overlay=True, geojson=False))
    assert res.mpp_source == "estimated from nuclei"
    assert abs(res.mpp[0] / truth - 1) <= 0.25
    assert res.provenance["slide"]["mpp_source"] == "estimated from nuclei"
    assert res.qc["mpp_metadata"] is None and res.qc["mpp_estimate"] == pytest.approx(res.mpp[0], rel=1e-3)
    assert res.tiles_tissue > 0 and Path(res.outputs["overlay"]).is_file()
    assert HeatmapStore.open(res.store).attrs["slide"]["mpp_source"] == "estimated from nuclei"


@pytest.mark.realdata
@pytest.mark.parametrize("key", ["svs", "tiff", "jp2k_svs", "dicom"])
def test_qc_cli_on_every_real_slide(real_slide, tmp_path: Path, key: str) -> None:
    path = real_slide(key)
    assert main(["qc", str(path), "--out", str(tmp_path), "-q"]) == 0
    report = json.loads((tmp_path / f"{path.stem}_qc.json").read_text())
    assert set(report) >= REPORT_KEYS
    png = tmp_path / f"{path.stem}_qc.png"
    assert png.is_file() and Image.open(png).size[0] > 500
    lo, hi = report["mpp_estimate_interval"]
    assert lo <= report["mpp_estimate"] <= hi
    if key in ("svs", "tiff"):
        assert report["mpp_metadata"] == pytest.approx([0.499, 0.499])
        assert abs(report["mpp_estimate"] / 0.499 - 1) <= 0.25
        assert report["ink_fraction"] < 0.01
    else:  # no metadata: the QC ran on the estimate and says so
        assert report["mpp_metadata"] is None and report["mpp_source"] == "estimated from nuclei"
        assert any("no µm/px metadata" in w for w in report["warnings"])
    if key == "dicom":
        assert report["ink_fraction"] > 0.1 and report["ink_tiles"] > 0


@pytest.mark.realdata
def test_mpp_check_warns_on_a_wrong_label(real_slide, tmp_path: Path) -> None:
    path = real_slide("svs")
    out = tmp_path / "qc"
    # a 40x label (0.25) on this 20x scan (0.499): the estimate says ~0.5, a factor ~2 apart
    assert main(["qc", str(path), "--out", str(out), "--mpp", "0.25", "-q"]) == 0
    report = json.loads((out / f"{path.stem}_qc.json").read_text())
    assert any("differ by" in w for w in report["warnings"])
    assert main(["qc", str(path), "--out", str(out), "--mpp", "0.25", "--mpp-check", "off", "-q"]) == 0
    report = json.loads((out / f"{path.stem}_qc.json").read_text())
    assert report["mpp_estimate"] is None and not any("differ by" in w for w in report["warnings"])


@pytest.mark.realdata
def test_resumed_run_keeps_the_ink_exclusion(real_slide, tmp_path: Path) -> None:
    cfg = InferenceConfig(progress=False, overlay=False, geojson=False, tissue_threshold=0.25, mpp_check=False)
    first = analyze_slide(real_slide("dicom"), out=tmp_path / "a", mpp=0.5, config=cfg)
    assert first.qc["ink_fraction"] > 0.1 and first.qc["ink_tiles"] > 0
    again = analyze_slide(real_slide("dicom"), out=tmp_path / "a", mpp=0.5, config=cfg)  # inputs from the store
    assert again.blocks_skipped == again.blocks_total
    assert again.tiles_tissue == first.tiles_tissue
    assert again.qc["ink_fraction"] == first.qc["ink_fraction"]
    assert again.qc["ink_tiles"] == first.qc["ink_tiles"]


@pytest.mark.realdata
def test_tiles_verb_takes_an_estimated_mpp(real_slide, capsys) -> None:
    assert main(["tiles", str(real_slide("svs")), "--mpp", "estimate"]) == 0
    out = capsys.readouterr().out
    assert "estimated from nuclei" in out and "marker ink: " in out
