"""Level-0 grids on slides whose pixels are not square: every recorded level-0 value is the lattice.

WSInfer's patch is ``P = round(tile_size * spacing / m)`` level-0 px on BOTH axes, with ``m`` the
mean of the slide's x and y µm/px (see :mod:`wsi_cmaf.slide.level0`). Here mpp = (0.25, 0.5):
m = 0.375, and 50 px at 4 µm/px is P = round(200 / 0.375) = round(533.33) = 533 level-0 px, so
tile (r, c) covers x in [533 c, 533 c + 533), y in [533 r, 533 r + 533). The grid's effective
µm/px is 533 * 0.375 / 50 = 3.9975; dividing it by mpp_x or mpp_y (the old code) gave strides of
50 * 3.9975 / 0.5 = 399.75 (y) and / 0.25 = 799.5 (x) level-0 px. Every number is worked out by
hand in the comments.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers.wsinfer import TinyNet, analyze_on_lattice, zoo_folder
from wsi_cmaf.infer.attrs import _stride_level0, _um_per_tile
from wsi_cmaf.infer.summary import failure_records
from wsi_cmaf.slide.grid import GridConfig, TileGrid

ANISO = (0.25, 0.5)  # (x, y) µm/px; mean 0.375
SIZE0 = (2000, 1400)  # level-0 (width, height)


def _grid(tile: int, mpp: float, source: str, stride: int | None = None,
          slide_mpp: tuple[float, float] = ANISO, block_tiles: int = 2) -> TileGrid:
    cfg = GridConfig(mpp=mpp, tile_size=tile, stride=stride, source=source, block_tiles=block_tiles)
    shape = TileGrid.grid_shape(SIZE0, slide_mpp, cfg)
    return TileGrid(cfg, 0, 1.0, slide_mpp, SIZE0, np.ones(shape, np.float32))


def test_lattice_by_hand() -> None:
    # the premise of the values below: 533-px squares stepping by 533 on both axes
    grid = _grid(50, 4.0, "level0")
    assert grid.level0_pitch == (533, 533)
    assert grid.config.mpp == pytest.approx(3.9975)
    assert grid.tile_location(1, 2) == (1066, 533)
    assert not grid.exact  # non-square pixels: never a plain crop


def test_stride_and_um_per_tile_are_the_lattice() -> None:
    grid = _grid(50, 4.0, "level0")
    # (y, x) level-0 px: S = 533 on both axes (old: 399.75, 799.5)
    assert _stride_level0(grid, ANISO) == (533.0, 533.0)
    # (y, x) µm: 533 * 0.5 = 266.5 and 533 * 0.25 = 133.25 (old: 50 * 3.9975 = 199.875 on both)
    assert _um_per_tile(grid) == pytest.approx((266.5, 133.25))
    # overlap: 50 px at 3.75 µm/px is 187.5 / 0.375 = 500 level-0 px; stride 25 is S = 250
    half = _grid(50, 3.75, "level0", stride=25)
    assert half.level0_pitch == (500, 250)
    assert _stride_level0(half, ANISO) == (250.0, 250.0)  # old: 25 * 3.75 / 0.5 = 187.5, / 0.25 = 375
    assert _um_per_tile(half) == pytest.approx((125.0, 62.5))  # 250 * 0.5, 250 * 0.25


@pytest.mark.parametrize("m", [0.499, 0.2527, 0.2631])
def test_square_pixel_layout_is_bit_identical(m: float) -> None:
    # a resume compares the store's layout (um_per_tile included) with ==: on square pixels the
    # value must be the old step * effective mpp to the last bit (224 px at 0.5 µm/px on 0.2631:
    # 426 * 0.2631 = 112.0806 but 224 * (426 * 0.2631 / 224) = 112.08060000000002)
    grid = _grid(224, 0.5, "level0", slide_mpp=(m, m))
    old = 224 * grid.config.mpp
    assert _um_per_tile(grid) == (old, old)
    assert _um_per_tile(grid) == pytest.approx((grid.level0_pitch[1] * m,) * 2)
    assert _stride_level0(grid, (m, m)) == (float(grid.level0_pitch[1]),) * 2


def test_pyramid_grids_are_unchanged() -> None:
    # the target grid is resampled to 4 µm/px on both axes: 200 µm, 800 level-0 px in x, 400 in y
    grid = _grid(50, 4.0, "pyramid")
    assert _stride_level0(grid, ANISO) == (400.0, 800.0)
    assert _um_per_tile(grid) == (200.0, 200.0)
    overlap = _grid(50, 4.0, "pyramid", stride=25)
    assert _stride_level0(overlap, ANISO) == (200.0, 400.0)
    assert _um_per_tile(overlap) == (100.0, 100.0)
    # square pixels, exact level: 50 px at 1 µm/px on 1 µm/px
    exact = _grid(50, 1.0, "pyramid", slide_mpp=(1.0, 1.0))
    assert exact.exact and _stride_level0(exact, (1.0, 1.0)) == (50.0, 50.0)
    assert _um_per_tile(exact) == (50.0, 50.0)


def _failures(grid: TileGrid, bad: list[tuple[int, int]]) -> list[dict]:
    """failure_records of ``grid`` with tiles ``bad`` undecodable (a stand-in for the store)."""
    failed_tiles = np.zeros(grid.shape, bool)
    for r, c in bad:
        failed_tiles[r, c] = True
    blocks = (grid.n_block_rows, grid.n_block_cols)
    store = SimpleNamespace(failed_tiles=failed_tiles, errors={}, tile_errors={},
                            failed=np.zeros(blocks, bool), done=np.ones(blocks, bool))
    n, records = failure_records(grid, store, SimpleNamespace(failed_tiles=()))
    assert n == len(bad) == len(records)
    return records


def test_failed_tile_boxes_are_the_region_read() -> None:
    grid = _grid(50, 4.0, "level0")
    (rec,) = _failures(grid, [(1, 2)])
    # old: round(199.875 / 0.25) = round(799.5) = 800 wide, round(199.875 / 0.5) = round(399.75) = 400 high
    assert (rec["x"], rec["y"], rec["width"], rec["height"]) == (1066, 533, 533, 533)
    assert isinstance(rec["width"], int) and isinstance(rec["height"], int)
    # overlapping level-0 tiles: 500-px squares on a 250-px lattice
    half = _grid(50, 3.75, "level0", stride=25)
    (rec,) = _failures(half, [(1, 3)])
    assert (rec["x"], rec["y"], rec["width"], rec["height"]) == (750, 250, 500, 500)


def test_failed_tile_boxes_of_pyramid_grids_are_unchanged() -> None:
    # 200 µm tiles: 200 / 0.25 = 800 level-0 px wide, 200 / 0.5 = 400 high; corners col * 800, row * 400
    (rec,) = _failures(_grid(50, 4.0, "pyramid"), [(1, 1)])
    assert (rec["x"], rec["y"], rec["width"], rec["height"]) == (800, 400, 800, 400)


@pytest.fixture(scope="module")
def aniso_store(tmp_path_factory):
    """A level-0 run on a synthetic slide read with mpp (0.25, 0.5), 50 px at 4 µm/px tiles."""
    from wsi_cmaf.infer.config import InferenceConfig
    from wsi_cmaf.infer.pipeline import analyze_slide
    from wsi_cmaf.output.store import HeatmapStore
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    tmp = tmp_path_factory.mktemp("aniso")
    slide = tmp / "s.tiff"
    write_synthetic_slide(slide, *SIZE0, 0.25, seed=3, tumour=True)
    torch.manual_seed(0)
    folder = zoo_folder(tmp, TinyNet(), 50, 4.0, 64)
    run = InferenceConfig(batch_size=16, overlay=False, geojson=False, progress=False, precision="off")
    analyze_slide(slide, model=folder, out=tmp / "out", config=run, mpp=ANISO)
    return HeatmapStore.open(tmp / "out" / "s.zarr")


def test_store_records_the_lattice(aniso_store) -> None:
    from wsi_cmaf.output.tiles import tile_table

    store = aniso_store
    assert store.attrs["slide"]["mpp"] == list(ANISO)
    # 2000 / 533 = 3.75 -> 4 columns; 1400 / 533 = 2.63 -> 3 rows (the last ones partial)
    assert store.grid_shape == (3, 4)
    assert store.attrs["grid"]["tile_origin_level0"] == [0, 0]
    assert store.attrs["grid"]["tile_stride_level0"] == [533.0, 533.0]  # old: [399.75, 799.5]
    assert store.um_per_tile == pytest.approx((266.5, 133.25))  # old: (199.875, 199.875)
    assert store.geometry.stride_level0 == pytest.approx((533, 533))  # old: (799.5, 399.75)
    table = tile_table(store, tissue_only=False)
    assert (table["x"] == table["col"] * 533).all() and (table["y"] == table["row"] * 533).all()
    # µm centres step by the lattice too: 533 * 0.25 in x, 533 * 0.5 in y
    assert np.diff(np.unique(table["x_um"])) == pytest.approx([133.25] * 3)
    assert np.diff(np.unique(table["y_um"])) == pytest.approx([266.5] * 2)


def test_store_tile_size_is_the_lattice(aniso_store) -> None:
    from wsi_cmaf.output.overlay import _grid_axes
    from wsi_cmaf.output.tiles import tile_table, tiles_geojson

    store = aniso_store
    assert store.attrs["grid"]["tile_size_level0"] == [533, 533]
    # the tile a level-0 grid reads is 533 x 533 level-0 px (old: 50 * 3.9975 / 0.25 = 799.5 by / 0.5 = 399.75)
    assert store.geometry.tile_level0 == pytest.approx((533, 533))
    table = tile_table(store, tissue_only=False)
    assert (table["w"] == 533).all() and (table["h"] == 533).all()  # old: 800 x 400
    # centre of tile (r, c): (533 c + 266.5, 533 r + 266.5); old x: 399.75 + 533 c, y: 199.875 + 533 r
    cx, cy = store.geometry.tile_to_level0(np.array([0, 2]), np.array([0, 3]))
    assert cx == pytest.approx([266.5, 3 * 533 + 266.5]) and cy == pytest.approx([266.5, 2 * 533 + 266.5])
    # NGFF centre of tile (0, 0) in µm (y, x): 266.5 * 0.5 and 266.5 * 0.25
    assert store.geometry.pyramid().centre_um == pytest.approx((133.25, 66.625))
    assert table["x_um"].min() == pytest.approx(66.625) and table["y_um"].min() == pytest.approx(133.25)
    # overlay: the grid's top-left edge is the slide's corner (old: 399.75 - 266.5 by 199.875 - 266.5)
    start, step, _, unit = _grid_axes(store)
    assert start == pytest.approx((0.0, 0.0)) and step == pytest.approx((533.0, 533.0))
    assert unit == "level-0 px"
    # GeoJSON tile boxes: tile (r, c) spans [533 c, 533 c + 533) x [533 r, 533 r + 533), clipped at 2000 x 1400
    feats = tiles_geojson(store)["features"]
    assert feats
    for f in feats:
        m = f["properties"]["measurements"]
        xs, ys = zip(*f["geometry"]["coordinates"][0])
        assert (min(xs), max(xs)) == pytest.approx((533 * m["col"], min(533 * m["col"] + 533, 2000)))
        assert (min(ys), max(ys)) == pytest.approx((533 * m["row"], min(533 * m["row"] + 533, 1400)))


def _attrs_of(mpp: tuple[float, float], grid: TileGrid, level0_key: bool) -> dict:
    from wsi_cmaf.infer.attrs import _tile_size_level0_attrs

    g = {"tile_size": grid.config.tile_size, "mpp": grid.config.mpp, "tile_origin_level0": [0, 0]}
    return {"slide": {"mpp": list(mpp)}, "grid": {**g, **(_tile_size_level0_attrs(grid) if level0_key else {})}}


@pytest.mark.parametrize("m", [0.499, 0.2527, 0.2631, 0.25])
@pytest.mark.parametrize("tile, mpp", [(224, 0.5), (50, 4.0), (256, 0.25)])
def test_square_pixel_geometry_is_bit_identical(m: float, tile: int, mpp: float) -> None:
    from wsi_cmaf.output.geometry import TileGeometry

    grid = _grid(tile, mpp, "level0", slide_mpp=(m, m))
    um = _um_per_tile(grid)
    new = TileGeometry.from_attrs(_attrs_of((m, m), grid, True), um)
    old = TileGeometry.from_attrs(_attrs_of((m, m), grid, False), um)  # a store made before the key
    assert new == old and new.to_dict() == old.to_dict()  # exact, to the last bit
    assert new.tile_level0 == pytest.approx((grid.level0_pitch[0],) * 2)


def test_tile_size_level0_attrs() -> None:
    from wsi_cmaf.infer.attrs import _tile_size_level0_attrs
    from wsi_cmaf.output.geometry import TileGeometry

    assert _tile_size_level0_attrs(_grid(50, 4.0, "level0")) == {"tile_size_level0": [533, 533]}
    assert _tile_size_level0_attrs(_grid(50, 3.75, "level0", stride=25)) == {"tile_size_level0": [500, 500]}
    # pyramid grids: no key, so their attributes and geometry stay as they were (800 x 400 level-0 px)
    pyr = _grid(50, 4.0, "pyramid")
    assert _tile_size_level0_attrs(pyr) == {}
    geo = TileGeometry.from_attrs(_attrs_of(ANISO, pyr, True), _um_per_tile(pyr))
    assert geo.tile_level0 == (800.0, 400.0) and geo.stride_level0 == (800.0, 400.0)
    # a level-0 store without the key (made before it) keeps the old per-axis size
    lvl = _grid(50, 4.0, "level0")
    old = TileGeometry.from_attrs(_attrs_of(ANISO, lvl, False), _um_per_tile(lvl))
    assert old.tile_level0 == pytest.approx((799.5, 399.75))
    half = _grid(50, 3.75, "level0", stride=25)  # 500-px squares on a 250-px lattice
    geo = TileGeometry.from_attrs(_attrs_of(ANISO, half, True), _um_per_tile(half))
    assert geo.tile_level0 == pytest.approx((500, 500)) and geo.stride_level0 == pytest.approx((250, 250))


def test_resume_of_a_square_pixel_store_made_before_the_key(tmp_path) -> None:
    # attributes are not compared on resume (layout and identity are): a level-0 store made before
    # tile_size_level0 was recorded resumes, gains the key, and its geometry is what it was
    import json

    from wsi_cmaf.infer.pipeline import analyze_slide
    from wsi_cmaf.output.store import HeatmapStore

    slide, folder, run, store_path = analyze_on_lattice(tmp_path, 1200, 900)
    made = HeatmapStore.open(store_path)
    assert made.attrs["grid"]["tile_size_level0"] == [401, 401]
    geometry = made.geometry.to_dict()
    meta_path = store_path / "zarr.json"
    doc = json.loads(meta_path.read_text())
    del doc["attributes"]["wsi_cmaf"]["grid"]["tile_size_level0"]
    doc["attributes"]["wsi_cmaf"]["marker"] = "old store"  # survives a resume, not a recreation
    meta_path.write_text(json.dumps(doc))
    assert "tile_size_level0" not in HeatmapStore.open(store_path).attrs["grid"]
    analyze_slide(slide, model=folder, out=tmp_path / "out", config=run, resume=True)
    resumed = HeatmapStore.open(store_path)
    assert resumed.attrs["marker"] == "old store"
    assert resumed.attrs["grid"]["tile_size_level0"] == [401, 401]
    assert resumed.geometry.to_dict() == geometry
