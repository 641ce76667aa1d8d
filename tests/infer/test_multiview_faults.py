"""Undecodable slide tiles under a multi-view model: a bad tile at the grid's level fails only the
tiles whose own view touches it; a bad tile at the context level makes the touched tiles' context
view missing (masked by the model) instead of failing them. Everything else equals a clean run."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from tests.helpers.multiview import VIEWS, saved_multiview_model, views_by_hand
from tests.helpers.slides import corrupt
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.multiview import read_block_views_tolerant
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reader import open_slide
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.slide.tissue import TissueMask
from wsi_cmaf.slide.views import ViewSpec, read_block_views

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, overlay=False, geojson=False,
                      compile="off", precision="off", reader_threads=1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """1 µm/px with levels at 1 / 4 / 8 / 32 µm/px: the tile view crops level 1, the 16 µm/px
    context resamples level 2, and the tissue stage reads the coarsest level."""
    d = tmp_path_factory.mktemp("mvfaults")
    return write_synthetic_slide(d / "mv.svs", width=4096, height=3072, mpp=1.0, tile=256,
                                 downsamples=(1, 4, 8, 32), seed=7, save_mask=False).path


@pytest.fixture(scope="module")
def slide_ctx(tmp_path_factory):
    """1 µm/px with levels at 1 / 4 / 16 / 32 µm/px: the tissue stage (8 µm/px) and the tile view
    read level 1, the 16 µm/px context alone reads level 2."""
    d = tmp_path_factory.mktemp("mvfaults_ctx")
    return write_synthetic_slide(d / "ctx.svs", width=4096, height=3072, mpp=1.0, tile=256,
                                 downsamples=(1, 4, 16, 32), seed=7, save_mask=False).path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_multiview_model(tmp_path_factory.mktemp("model") / "mv")


@pytest.fixture(scope="module")
def clean(slide, model_dir, tmp_path_factory):
    res = analyze_slide(slide, model=model_dir[0], out=tmp_path_factory.mktemp("clean"), config=CFG)
    return res, HeatmapStore.open(res.store)


def corrupt_tile(src, dst, level: int) -> tuple:
    """:func:`corrupt` the largest storage tile of ``level``: (path, (x0, y0, x1, y1) of it in level px)."""
    bad, (index,) = corrupt(src, dst, level=level)
    with tifffile.TiffFile(bad) as tf:
        per_row = -(-tf.series[0].levels[level].shape[1] // 256)
    ty, tx = divmod(index, per_row)
    return bad, (tx * 256, ty * 256, (tx + 1) * 256, (ty + 1) * 256)


def meets(x: np.ndarray, y: np.ndarray, size: int, box: tuple) -> np.ndarray:
    """Whether squares of ``size`` px at (x, y) overlap ``box`` = (x0, y0, x1, y1)."""
    return (x < box[2]) & (x + size > box[0]) & (y < box[3]) & (y + size > box[1])


def test_bad_tile_at_the_grid_level_fails_only_the_tiles_it_touches(slide, model_dir, clean, tmp_path):
    res0, store0 = clean
    # level 1 is the grid's pixel grid (4 µm/px): the bad 256 px storage tile fails exactly the
    # tissue tiles of 50 px whose footprint overlaps it
    bad, box = corrupt_tile(slide, tmp_path / "bad1.svs", 1)
    res = analyze_slide(bad, model=model_dir[0], out=tmp_path / "run1", config=CFG)
    store = HeatmapStore.open(res.store)
    a, b = store0.probabilities(0)[1], store.probabilities(0)[1]
    r, c = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    overlaps = meets(c * 50, r * 50, 50, box)
    failed = np.isfinite(a) & ~np.isfinite(b)
    np.testing.assert_array_equal(failed, overlaps & np.isfinite(a))
    assert failed.sum() > 0
    assert res.tiles_failed == failed.sum() and res.blocks_failed == 0  # tiles, not blocks, failed
    np.testing.assert_array_equal(store.failed_tiles, failed)
    both = np.isfinite(a) & np.isfinite(b)
    # the rest equals the clean run (to float rounding: a partial block's batches are smaller)
    np.testing.assert_allclose(a[both], b[both], rtol=0, atol=1e-6)
    assert failed.sum() + both.sum() == np.isfinite(a).sum()


def test_bad_tile_at_the_context_level_makes_that_view_missing(slide_ctx, model_dir, tmp_path):
    slide = slide_ctx
    res0 = analyze_slide(slide, model=model_dir[0], out=tmp_path / "clean", config=CFG)
    store0 = HeatmapStore.open(res0.store)
    with open_slide(slide) as reader:  # the context view's read level
        assert reader.level_for_mpp(16.0, 0.05) == 2 and reader.level_for_mpp(8.0) == 1
    bad, box = corrupt_tile(slide, tmp_path / "bad2.svs", 2)
    res = analyze_slide(bad, model=model_dir[0], out=tmp_path / "run2", config=CFG)
    store = HeatmapStore.open(res.store)
    np.testing.assert_array_equal(store.tissue_mask()[0], store0.tissue_mask()[0])  # same tissue stage
    a, b = store0.probabilities(0)[1], store.probabilities(0)[1]
    assert np.array_equal(np.isfinite(a), np.isfinite(b)) and res.tiles_failed == 0  # no tile failed
    changed = np.isfinite(a) & (a != b)
    # by hand: tile (r, c) is centred at 4 (50 c + 25) µm, i.e. (50 c + 25) / 4 context px of
    # 16 µm; its 50 px context starts at floor(centre - 25 + 0.5) and lies in level 2 as is (an
    # exact crop). The tiles that change are those whose (present) context meets the bad tile.
    r, c = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    ox, oy = np.floor((50 * c + 25) / 4 - 24.5), np.floor((50 * r + 25) / 4 - 24.5)
    rows_all, cols_all = np.nonzero(np.isfinite(a))
    clean_missing = views_by_hand(slide, store0, rows_all, cols_all)[2].missing
    had_context = np.zeros(a.shape, bool)
    had_context[rows_all, cols_all] = ~clean_missing[:, 1]
    np.testing.assert_array_equal(changed, meets(ox, oy, 50, box) & had_context)
    assert changed.sum() > 0
    rows, cols = np.nonzero(changed)
    views, miss, item = views_by_hand(slide, store0, rows, cols)
    missing = item.missing
    model = model_dir[1].eval()
    with torch.inference_mode():
        masked = torch.softmax(model(views, torch.stack([miss[:, 0], torch.ones_like(miss[:, 1])], 1)), 1)[:, 1]
    # every changed tile now equals the model with its context masked (its own view is clean)
    np.testing.assert_allclose(b[rows, cols], masked.numpy(), atol=2e-5)
    assert not missing[:, 1].all()  # teeth: these tiles did have their context on the clean slide


def test_tolerant_view_read_is_the_plain_read_on_a_clean_slide(slide, clean):
    res0, store0 = clean
    mask, mpp = store0.tissue_mask()
    specs = [ViewSpec(v["mpp"], v["size"]) for v in VIEWS]
    with open_slide(slide) as reader:
        grid = TileGrid.from_slide(reader, GridConfig(mpp=4.0, tile_size=50, block_tiles=4), TissueMask(mask, mpp))
        block = next(b for b in grid.blocks if grid.tissue_indices(b)[0].size)
        plain = read_block_views(reader, grid, block, specs)
        tolerant, failed, reason = read_block_views_tolerant(reader, grid, block, specs)
    assert not failed.any() and reason == ""
    np.testing.assert_array_equal(plain.missing, tolerant.missing)
    for p, t in zip(plain.views, tolerant.views):
        np.testing.assert_array_equal(p, t)
