"""Partial edge tiles: the grid covers the whole slide, edge tiles are padded, analysed and marked.

The test slide is 230 x 170 px at 4 µm/px (920 x 680 µm), white left of x = 100 px and pink tissue
from there to the right and bottom edges. The model grid is 50 px tiles at 4 µm/px, so level 0 is
cropped as it is: 4 whole columns (200 px) + 30 px = 0.6 of a fifth, 3 whole rows (150 px) + 20 px
= 0.4 of a fourth.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import tifffile
import zarr

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.errors import StoreMismatchError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.dask_tasks import SlideSpec, read_block_task
from wsi_cmaf.output.geojson import regions_geojson
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.tiles import tiles_geojson
from wsi_cmaf.slide import detect_tissue, open_slide
from wsi_cmaf.slide.grid import PAD_VALUE, GridConfig, TileGrid
from wsi_cmaf.slide.reads import read_block, read_tile

W, H, MPP = 230, 170, 4.0
PINK = (200, 120, 170)
CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    img = np.full((H, W, 3), 255, np.uint8)
    img[:, 100:] = PINK
    path = tmp_path_factory.mktemp("edges") / "edge.tiff"
    res = 1e4 / MPP  # px per cm
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), compression="zlib",  # lossless
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
    return path


def _grid(path, **kw) -> TileGrid:
    with open_slide(path) as reader:
        return TileGrid.from_slide(reader, GridConfig(mpp=kw.pop("mpp", 4.0), tile_size=kw.pop("tile_size", 50),
                                                      block_tiles=4, **kw), detect_tissue(reader))


def test_grid_has_ceil_rows_and_cols_with_inside_fractions(slide):
    grid = _grid(slide)
    assert grid.shape == (4, 5)  # ceil(170 / 50), ceil(230 / 50)
    assert grid.exact and grid.target_extent == pytest.approx((230.0, 170.0))
    want = np.outer([1, 1, 1, 0.4], [1, 1, 1, 1, 0.6])  # 20/50 and 30/50 inside; corner 0.24
    np.testing.assert_allclose(grid.inside_fraction, want, atol=1e-6)
    assert grid.partial.sum() == 4 + 5 - 1
    # tissue from x = 100 px (column 2) to the edges; measured over each tile's inside area
    assert grid.tissue[:, 2:].all() and not grid.tissue[:, :2].any()
    np.testing.assert_allclose(grid.tissue_fraction[:, 2:], 1.0, atol=1e-6)
    # whole tiles only (the old grid) drops the right and bottom strips with their tissue
    assert _grid(slide, min_inside_fraction=1.0).shape == (3, 4)


def test_partial_tiles_are_padded_with_white_on_the_analysis_path(slide):
    grid = _grid(slide)
    with open_slide(slide) as reader:
        spec = SlideSpec(str(slide), reader.backend, None)
        got = {}
        for block in grid.blocks:
            item = read_block_task(spec, grid, block)  # what the pipeline's reader threads run
            got.update({(int(r), int(c)): t for t, r, c in zip(item.tiles, item.rows, item.cols)})
        corner = got[(3, 4)]
        assert PAD_VALUE == 255
        assert (corner[:20, :30] == PINK).all()  # level-0 px x 200..229, y 150..169: slide pixels
        assert (corner[20:] == 255).all() and (corner[:, 30:] == 255).all()  # beyond the edges
        assert (got[(1, 4)][:, :30] == PINK).all() and (got[(1, 4)][:, 30:] == 255).all()
        assert (got[(3, 2)][:20] == PINK).all() and (got[(3, 2)][20:] == 255).all()
        np.testing.assert_array_equal(read_tile(reader, grid, 3, 4), corner)


def test_level0_source_pads_native_regions(slide):
    """WSInfer-style level-0 regions (25 px at 8 µm/px = 50 level-0 px, left native) are padded too."""
    grid = _grid(slide, mpp=8.0, tile_size=25, source="level0")
    assert grid.shape == (4, 5) and not grid.exact  # 115 / 25 = 4.6, 85 / 25 = 3.4 target px
    with open_slide(slide) as reader:
        block = next(b for b in grid.blocks if b.index == (0, 1))
        bt = read_block(reader, grid, block)
        corner = bt.tiles[(bt.rows == 3) & (bt.cols == 4)][0]
        assert corner.shape == (50, 50, 3)  # level-0 (200, 150) .. (250, 200); slide ends at (230, 170)
        assert (corner[:20, :30] == PINK).all() and (corner[20:] == 255).all() and (corner[:, 30:] == 255).all()
        np.testing.assert_array_equal(read_tile(reader, grid, 3, 4), corner)


def test_analysis_marks_partial_tiles_and_exports_them(slide, tmp_path):
    res = analyze_slide(slide, model=DarknessClassifier(), model_config=tiny_config(), out=tmp_path / "o", config=CFG)
    assert res.tiles_total == 20 and res.tiles_tissue == 12
    store = HeatmapStore.open(res.store)
    probs = store.probabilities(0)[1]
    assert np.isfinite(probs[:, 2:]).all() and np.isnan(probs[:, :2]).all()
    # the padding is white and the model sees it: the mostly-white corner tile is less "dark" than
    # a whole pink tile (DarknessClassifier's malignant probability falls with brightness)
    assert probs[3, 4] < probs[3, 3] < probs[1, 2] and probs[1, 4] < probs[1, 2]
    np.testing.assert_allclose(store.inside_fraction(), np.outer([1, 1, 1, 0.4], [1, 1, 1, 1, 0.6]), atol=1e-6)
    edge = store.attrs["edge_tiles"]
    assert edge["policy"] == "padded" and edge["pad_value"] == 255 and edge["min_inside_fraction"] == 0.25
    # partial: column 4 (4 tiles) and row 3 (5), sharing the corner; with tissue: (0..3, 4), (3, 2), (3, 3)
    assert edge["n_partial"] == 8 and edge["n_partial_tissue"] == 6

    table = res.tiles()
    assert len(table) == 12 and table["partial"].sum() == 6
    corner = table.set_index(["row", "col"]).loc[(3, 4)]
    assert corner["partial"] and corner["inside_fraction"] == pytest.approx(0.24)
    assert (corner["x"], corner["y"], corner["w"], corner["h"]) == (200, 150, 50, 50)  # the analysed tile

    fc = tiles_geojson(store)
    feat = next(f for f in fc["features"] if (f["properties"]["measurements"]["row"],
                                              f["properties"]["measurements"]["col"]) == (3, 4))
    assert feat["properties"]["measurements"]["inside_fraction"] == 0.24
    assert feat["geometry"]["coordinates"] == [[[200, 150], [230, 150], [230, 170], [200, 170], [200, 150]]]

    regions = regions_geojson(store, threshold=0.0)  # every tissue tile: one 4 x 3 tile region
    (region,) = regions["features"]
    shape = shapely.geometry.shape(region["geometry"])
    assert shape.is_valid and shape.bounds == (100.0, 0.0, 230.0, 170.0)  # tiles reach 250 x 200: clipped
    assert shapely.box(0, 0, W, H).contains(shape)
    # 130 x 170 level-0 px of 4 x 4 µm inside the slide (12 whole tiles would be 480,000 µm²)
    assert region["properties"]["measurements"]["area_um2"] == pytest.approx(130 * 170 * 16.0)
    saved = json.loads(res.outputs["geojson"].read_text())
    for f in saved["features"]:
        assert shapely.box(0, 0, W, H).contains(shapely.geometry.shape(f["geometry"]))


def test_store_from_before_edge_tiles_is_refused(slide, tmp_path):
    out = tmp_path / "o"
    first = analyze_slide(slide, model=DarknessClassifier(), model_config=tiny_config(), out=out, config=CFG)
    again = analyze_slide(slide, model=DarknessClassifier(), model_config=tiny_config(), out=out, config=CFG)
    assert again.blocks_computed == 0 and again.blocks_skipped == first.blocks_total  # same layout resumes
    # what an older version wrote: no min_inside_fraction in the grid config, whole tiles only
    root = zarr.open_group(str(first.store), mode="r+")
    meta = dict(root.attrs["wsi_cmaf"])
    del meta["identity"]["grid"]["config"]["min_inside_fraction"]
    meta["identity"]["grid"]["shape"] = [3, 4]
    root.attrs["wsi_cmaf"] = meta
    with pytest.raises(StoreMismatchError, match="min_inside_fraction"):
        analyze_slide(slide, model=DarknessClassifier(), model_config=tiny_config(), out=out, config=CFG)


def test_cmu_slide_last_partial_row_and_column_are_present(real_slide):
    path = real_slide("svs")  # skips, printing why, when the real slides are absent
    with open_slide(path) as reader:
        assert reader.level_dimensions[0] == (2220, 2967) and reader.mpp == pytest.approx((0.499, 0.499))
        grid = TileGrid.from_slide(reader, GridConfig(mpp=4.0, tile_size=50), detect_tissue(reader))
    # 2220 * 0.499 / 4 = 276.9 target px: 5 whole columns + 26.9 px; 2967 * 0.499 / 4 = 370.1:
    # 7 whole rows + 20.1 px (the 216 and 161 level-0 px strips once dropped)
    assert grid.shape == (8, 6)
    assert grid.inside_fraction[-1, 0] == pytest.approx((2967 * 0.499 / 4 - 350) / 50, abs=1e-5)
    assert grid.inside_fraction[0, -1] == pytest.approx((2220 * 0.499 / 4 - 250) / 50, abs=1e-5)
    assert grid.tissue[-1].sum() >= 1  # the tissue reaching the bottom edge is now analysed
