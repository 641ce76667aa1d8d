"""Tile-level fault isolation in the inference pipeline (issue 13 §1): block reads, stain sample, summary.

Fixtures are built here: small synthetic Aperio-style pyramids with chosen JPEG tiles made
undecodable by turning byte 3 of the tile's JPEG stream (the APP0 marker type) into 0x3F, as in
tests/slide/test_faults.py ("Unsupported marker type 0x3f" in OpenSlide and imagecodecs alike).

Fault classes covered: an undecodable tile at the level the grid reads (exact crops and resized
windows, OpenSlide and tiffslide block reads); at the level the tissue stage reads; at both; every
tissue tile of the grid's level undecodable (the slide fails as a whole); undecodable tiles in the
stain-fit sample; a rerun retrying blocks written with failed tiles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from tests.helpers.models import DarknessClassifier, tiny_config
from tests.helpers.slides import corrupt
from wsi_cmaf.errors import NoDecodableTissueError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.stainfit import read_sample
from wsi_cmaf.slide import GridConfig, TileGrid, open_slide, write_synthetic_slide

CFG = dict(block_tiles=4, progress=False, batch_size=64, overlay=False, geojson=False)
TILE = 256


@pytest.fixture(scope="module")
def exact_slide(tmp_path_factory) -> Path:
    """1 µm/px, levels at 1 / 4 / 8 µm/px: the grid (4 µm/px) crops level 1, the tissue stage reads level 2."""
    d = tmp_path_factory.mktemp("tilefaults")
    return write_synthetic_slide(d / "exact.svs", width=4096, height=3072, mpp=1.0, tile=TILE,
                                 downsamples=(1, 4, 8), seed=7, save_mask=False).path


@pytest.fixture(scope="module")
def resize_slide(tmp_path_factory) -> Path:
    """0.5 µm/px, levels at 0.5 / 2 / 8 µm/px: the grid resizes level 1 by 2."""
    d = tmp_path_factory.mktemp("tilefaults_rs")
    return write_synthetic_slide(d / "resize.svs", width=6144, height=4096, mpp=0.5, tile=TILE,
                                 downsamples=(1, 4, 16), seed=8, save_mask=False).path


def run(path: Path, out: Path, backend: str = "auto", **cfg):
    config = InferenceConfig(**{**CFG, **cfg})
    return analyze_slide(path, model=DarknessClassifier(), model_config=tiny_config(), out=out,
                         backend=backend, config=config)


def level0(res) -> np.ndarray:
    return np.asarray(zarr.open_group(str(res.store), mode="r")["0"])


def expected_failed(path: Path, level: int, tile: int, tissue: np.ndarray, margin: int = 0,
                    scale: float = 1.0) -> np.ndarray:
    """Grid tiles (50 px at the grid's spacing) whose level-px footprint, widened by ``margin``,
    meets storage tile ``tile`` of ``level``."""
    with open_slide(path, backend="tiffslide") as r:
        lw, _ = r.level_dimensions[level]
    row, col = divmod(tile, -(-lw // TILE))
    bx0, by0 = col * TILE, row * TILE
    rows, cols = np.indices(tissue.shape)
    x0, x1 = cols * 50 * scale - margin, (cols * 50 + 50) * scale + margin
    y0, y1 = rows * 50 * scale - margin, (rows * 50 + 50) * scale + margin
    return tissue & (x0 < bx0 + TILE) & (bx0 < x1) & (y0 < by0 + TILE) & (by0 < y1)


@pytest.mark.parametrize(("backend", "block_backend"), [("openslide", "same"), ("tiffslide", "same")])
def test_bad_tile_at_grid_level_fails_only_the_tiles_it_touches(exact_slide, tmp_path, backend, block_backend):
    bad, (tile,) = corrupt(exact_slide, tmp_path / "bad.svs", 1)
    clean = run(exact_slide, tmp_path / "clean", backend, block_backend=block_backend)
    res = run(bad, tmp_path / "bad", backend, block_backend=block_backend)
    ref, got = level0(clean), level0(res)
    tissue = np.isfinite(ref[1])
    want = expected_failed(bad, 1, tile, tissue)
    assert want.any() and res.tissue_stage_failed_tiles == 0  # the tissue stage reads level 2: intact
    store = zarr.open_group(str(res.store), mode="r")
    np.testing.assert_array_equal(np.asarray(store["wsi_cmaf/failed_tiles"]), want)
    assert res.tiles_failed == int(want.sum()) and res.blocks_failed == 0
    assert res.blocks_computed == res.blocks_total
    assert np.isnan(got[:, want]).all()
    ok = tissue & ~want
    np.testing.assert_allclose(got[:, ok], ref[:, ok], rtol=0, atol=1e-6)  # the rest of the slide as if clean
    # the summary names every failed tile with its level-0 box (grid px x 4 at 1 µm/px)
    listed = {(f["x"], f["y"]) for f in res.failed_tiles if f["stage"] == "inference"}
    assert listed == {(int(c) * 200, int(r) * 200) for r, c in zip(*np.nonzero(want))}
    assert all("0x3f" in f["reason"] and f["width"] == 200 for f in res.failed_tiles)
    summary = json.loads(res.outputs["summary"].read_text())
    assert summary["tiles_failed"] == res.tiles_failed and len(summary["failed_tiles"]) == res.tiles_failed


def test_resized_grid_marks_tiles_within_the_filter_reach(resize_slide, tmp_path):
    bad, (tile,) = corrupt(resize_slide, tmp_path / "bad.svs", 1)
    clean = run(resize_slide, tmp_path / "clean", "tiffslide")
    res = run(bad, tmp_path / "bad", "tiffslide")
    ref, got = level0(clean), level0(res)
    tissue = np.isfinite(ref[1])
    failed = np.asarray(zarr.open_group(str(res.store), mode="r")["wsi_cmaf/failed_tiles"])
    core = expected_failed(bad, 1, tile, tissue, scale=2.0)  # tiles whose own pixels lie on the bad tile
    reach = expected_failed(bad, 1, tile, tissue, margin=3, scale=2.0)  # + the resampling margin
    assert core.any() and (failed >= core).all() and (failed <= reach).all()
    assert res.blocks_failed == 0 and res.tiles_failed == int(failed.sum())
    ok = tissue & ~failed
    np.testing.assert_allclose(got[:, ok], ref[:, ok], rtol=0, atol=1e-6)


def test_tissue_stage_failures_are_in_the_summary(exact_slide, tmp_path):
    bad, (t2,) = corrupt(exact_slide, tmp_path / "bad2.svs", 2)  # the level the tissue stage reads
    res = run(bad, tmp_path / "o")
    assert res.tissue_stage_failed_tiles == 1 and res.tiles_failed == 0
    (rec,) = [f for f in res.failed_tiles if f["stage"] == "tissue"]
    with open_slide(bad) as r:
        across = -(-r.level_dimensions[2][0] // TILE)
    row, col = divmod(t2, across)
    assert (rec["x"], rec["y"], rec["width"]) == (col * TILE * 8, row * TILE * 8, TILE * 8)
    assert any("tissue mask" in w for w in res.warnings)
    assert "1 undecodable in the tissue stage" in "\n".join(res.summary_lines())


def test_rerun_retries_blocks_with_failed_tiles(exact_slide, tmp_path):
    bad, _ = corrupt(exact_slide, tmp_path / "bad.svs", 1)
    first = run(bad, tmp_path / "o")
    with_faults = {(f["row"] // 4, f["col"] // 4) for f in first.failed_tiles if f["stage"] == "inference"}
    again = run(bad, tmp_path / "o")
    assert again.blocks_computed == len(with_faults) > 0
    assert again.blocks_skipped == first.blocks_total - len(with_faults)
    np.testing.assert_array_equal(level0(first), level0(again))
    assert again.tiles_failed == first.tiles_failed


def test_no_decodable_tissue_at_the_grid_level_fails_the_slide(exact_slide, tmp_path):
    with tifffile.TiffFile(exact_slide) as tf:
        n = len(tf.series[0].levels[1].pages[0].dataoffsets)
    bad, _ = corrupt(exact_slide, tmp_path / "dead.svs", 1, list(range(n)))
    with pytest.raises(NoDecodableTissueError) as exc:
        run(bad, tmp_path / "o")
    assert "none of the" in str(exc.value) and str(bad) in str(exc.value)


def test_stain_sample_skips_undecodable_tiles(exact_slide, tmp_path):
    bad, (tile,) = corrupt(exact_slide, tmp_path / "bad.svs", 1)
    with open_slide(exact_slide) as r:
        from wsi_cmaf.slide import detect_tissue

        grid = TileGrid.from_slide(r, GridConfig(mpp=4.0, tile_size=50), detect_tissue(r))
    want = expected_failed(bad, 1, tile, grid.tissue)
    rows, cols = np.nonzero(grid.tissue)
    with open_slide(bad) as r:
        got = read_sample(r, grid, rows, cols)
    assert len(got) == rows.size - int(want.sum())
    assert not any(want[r, c] for r, c, _ in got)
    # and end to end with Macenko normalisation: the fit goes on without the bad tiles
    res = run(bad, tmp_path / "o", stain="macenko")
    assert res.tiles_failed == int(want.sum()) and not any("stain" in w for w in res.warnings)
