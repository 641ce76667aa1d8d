"""GeoJSON export: tile-exact, valid polygons in level-0 pixels, holes, QuPath measurements, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import shape

from wsi_cmaf.cli import main
from wsi_cmaf.errors import OutputError
from wsi_cmaf.output.geojson import regions_geojson, tile_union, write_geojson
from wsi_cmaf.output.store import HeatmapStore

ORIGIN = (64, 32)  # level-0 (x, y) of tile (0, 0)'s top-left
STRIDE = 800.0     # 50 px tiles at 4 µm/px on a 0.25 µm/px slide


def store_with(path: Path, positive: np.ndarray, *, mpp: bool = True, chunk=(8, 8)) -> HeatmapStore:
    """A finalized store whose class-1 probability is ``positive`` (NaN allowed)."""
    attrs = {"grid": {"tile_origin_level0": list(ORIGIN), "tile_size": 50, "mpp": 4.0},
             "model": {"name": "m", "config": {"positive_class": 1}}}
    if mpp:
        attrs["slide"] = {"path": "/x/slide.svs", "mpp": [0.25, 0.25]}
    store = HeatmapStore.open_or_create(
        path, grid_shape=positive.shape, chunk=chunk, class_names=["benign", "Tumor"], identity={"k": 1},
        attrs=attrs, um_per_tile=(200.0, 200.0))
    probs = np.stack([1 - positive, positive]).astype(np.float32)
    for by in range(store.done.shape[0]):
        for bx in range(store.done.shape[1]):
            rs, cs = store.block_slices((by, bx))
            store.write_block((by, bx), probs[:, rs, cs])
    store.write_tissue(np.isfinite(positive))
    store.finalize()
    return store


def ring_area(ring) -> float:
    x, y = np.asarray(ring, float).T
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def test_square_gives_one_polygon_on_the_tile_extent(tmp_path):
    p = np.full((20, 30), 0.1, np.float32)
    p[5:10, 10:17] = np.linspace(0.6, 0.95, 35).reshape(5, 7)
    fc = regions_geojson(store_with(tmp_path / "s.zarr", p), threshold=0.5)
    assert fc["type"] == "FeatureCollection"
    (feat,) = fc["features"]
    assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
    (ring,) = feat["geometry"]["coordinates"]
    xs, ys = np.asarray(ring).T
    assert (xs.min(), xs.max()) == (ORIGIN[0] + 10 * STRIDE, ORIGIN[0] + 17 * STRIDE)
    assert (ys.min(), ys.max()) == (ORIGIN[1] + 5 * STRIDE, ORIGIN[1] + 10 * STRIDE)
    assert len(ring) == 5 and ring[0] == ring[-1]  # a plain rectangle, closed
    assert ring_area(ring) == pytest.approx(35 * STRIDE ** 2) and ring_area(ring) > 0  # exterior CCW
    props = feat["properties"]
    # QuPath >= 0.4 imports only these keys of a Feature's properties: every number is a measurement
    assert set(props) <= {"name", "color", "classification", "isLocked", "measurements", "metadata", "objectType"}
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    m = props["measurements"]
    assert m["probability_mean"] == pytest.approx(float(p[5:10, 10:17].mean()), abs=1e-6)
    assert m["probability_max"] == pytest.approx(0.95, abs=1e-6)
    assert m["n_tiles"] == 35 and m["area_um2"] == pytest.approx(35 * 200.0 ** 2) and m["threshold"] == 0.5
    assert props["metadata"] == {"class_index": "1", "bbox_tiles": "5,10,10,17"}
    assert all(isinstance(v, str) for v in props["metadata"].values())


def test_hole_becomes_interior_ring_or_is_filled(tmp_path):
    p = np.zeros((12, 12), np.float32)
    p[2:9, 2:9] = 0.9
    p[4:6, 5] = np.nan  # a lumen without tissue inside the tumour is a hole too
    store = store_with(tmp_path / "s.zarr", p)
    (feat,) = regions_geojson(store, threshold=0.5)["features"]
    outer, hole = feat["geometry"]["coordinates"]
    assert ring_area(hole) == pytest.approx(-2 * STRIDE ** 2)  # clockwise, two tiles
    assert ring_area(outer) == pytest.approx(49 * STRIDE ** 2)
    assert feat["properties"]["measurements"]["n_holes"] == 1 and feat["properties"]["measurements"]["n_tiles"] == 47
    (filled,) = regions_geojson(store, threshold=0.5, fill_holes=True)["features"]
    assert len(filled["geometry"]["coordinates"]) == 1


def test_separate_regions_corner_contact_and_min_tiles(tmp_path):
    p = np.zeros((10, 10), np.float32)
    p[1:3, 1:3] = 0.8        # 4 tiles
    p[3, 3] = 0.8            # touches the first only at a corner -> its own region
    p[6:9, 6:9] = 0.7        # 9 tiles
    store = store_with(tmp_path / "s.zarr", p)
    feats = regions_geojson(store, threshold=0.5)["features"]
    assert sorted(f["properties"]["measurements"]["n_tiles"] for f in feats) == [1, 4, 9]
    assert len({f["id"] for f in feats}) == 3
    big = regions_geojson(store, threshold=0.5, min_tiles=2)["features"]
    assert sorted(f["properties"]["measurements"]["n_tiles"] for f in big) == [4, 9]
    assert regions_geojson(store, threshold=0.9)["features"] == []


def test_polygon_area_equals_tile_count_on_random_blobs(tmp_path):
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(rng.random((40, 36)), 2.0)
    p = ((p - p.min()) / (p.max() - p.min())).astype(np.float32)
    p[rng.random(p.shape) < 0.05] = np.nan
    store = store_with(tmp_path / "s.zarr", p)
    feats = regions_geojson(store, threshold=0.55)["features"]
    assert feats
    mask = np.nan_to_num(p, nan=-1) >= 0.55
    assert sum(f["properties"]["measurements"]["n_tiles"] for f in feats) == mask.sum()
    for f in feats:
        rings = f["geometry"]["coordinates"]
        area = ring_area(rings[0]) + sum(ring_area(r) for r in rings[1:])
        assert area == pytest.approx(f["properties"]["measurements"]["n_tiles"] * STRIDE ** 2)
        xy = np.asarray(rings[0])
        steps = np.diff(xy, axis=0)
        assert ((steps[:, 0] == 0) | (steps[:, 1] == 0)).all()  # edges follow tile boundaries


def test_store_without_slide_mpp_is_an_error(tmp_path):
    store = store_with(tmp_path / "s.zarr", np.full((4, 4), 0.9, np.float32), mpp=False)
    with pytest.raises(OutputError, match="µm/px"):
        regions_geojson(store)


def test_write_geojson_and_cli(tmp_path, capsys):
    p = np.zeros((10, 10), np.float32)
    p[2:4, 2:5] = 0.9
    store_with(tmp_path / "s.zarr", p)
    out = write_geojson(tmp_path / "s.zarr", tmp_path / "sub" / "r.geojson", threshold=0.5)
    written = json.loads(out.read_text())
    assert written["features"][0]["properties"]["measurements"]["n_tiles"] == 6
    prov = written["properties"]["provenance"]
    assert prov["store"] == str((tmp_path / "s.zarr").absolute()) and prov["export"]["output"] == str(out.absolute())
    assert prov["model"]["name"] == "m" and prov["export"]["created_utc"].endswith("Z")
    assert main(["export", "regions", str(tmp_path / "s.zarr"), "--threshold", "0.95"]) == 0
    written = json.loads((tmp_path / "s_regions.geojson").read_text())
    assert written["features"] == [] and "0 region" in capsys.readouterr().out
    assert main(["export", "regions", str(tmp_path)]) == 1  # exists but not a store: runtime error, one line
    assert main(["export", "regions", str(tmp_path / "missing.zarr")]) == 2  # no such path: usage error


def _valid_everywhere(fc) -> None:
    for f in fc["features"]:
        geom = shape(f["geometry"])
        assert geom.is_valid, shapely.is_valid_reason(geom)


def test_holes_touching_at_corners_give_valid_polygons(tmp_path):
    p = np.full((7, 7), 0.9, np.float32)
    p[1, 1] = p[2, 2] = np.nan  # two hole tiles meeting at one corner
    p[4, 4] = p[5, 5] = 0.1
    fc = regions_geojson(store_with(tmp_path / "s.zarr", p), threshold=0.5)
    _valid_everywhere(fc)
    (feat,) = fc["features"]
    assert feat["geometry"]["type"] == "Polygon" and feat["properties"]["measurements"]["n_holes"] == 4
    assert shape(feat["geometry"]).area == pytest.approx(45 * STRIDE ** 2)


def test_region_touching_itself_at_a_corner_is_valid(tmp_path):
    # one 4-connected region whose ends meet diagonally at (row 2, col 3): the enclosed pocket
    # touches the outside at that corner. The old contour tracer wrote an exterior passing the
    # same vertex twice ("Ring Self-intersection" in JTS/shapely).
    above = np.array([[c == "#" for c in row] for row in ["####", "#..#", "#.#.", "###."]])
    p = np.where(above, 0.9, 0.1).astype(np.float32)
    fc = regions_geojson(store_with(tmp_path / "s.zarr", p), threshold=0.5)
    _valid_everywhere(fc)
    (feat,) = fc["features"]
    assert feat["properties"]["measurements"]["n_tiles"] == 11
    assert shape(feat["geometry"]).area == pytest.approx(11 * STRIDE ** 2)


# Tiles with p >= 0.5 on the real TCGA slide (tcga-cr-7395-01a-01-ts1.svs analysed with --mpp 1.0 and
# the default model): the region with 129 tiles touches itself at the checkerboard at rows 13/14,
# columns 20/21, which made the old export write an invalid polygon.
TCGA_ABOVE = """
................#.....
...............##.....
...............#.#....
........##..####......
...#..###...####.##...
......###...##..#.#...
..#....####.##...##...
.#..#...##..#.....##..
##.......####.....##..
#.#..#.######.....####
.##..####.##......###.
.##.###.#.##.....##.##
...#######.#...###..##
...####...###.##...#.#
.....##########...###.
......#########..##.#.
.............#####..#.
"""


def test_real_tcga_pattern_gives_valid_polygons(tmp_path):
    above = np.array([[c == "#" for c in line] for line in TCGA_ABOVE.split()])
    p = np.where(above, 0.8, 0.2).astype(np.float32)
    fc = regions_geojson(store_with(tmp_path / "s.zarr", p), threshold=0.5)
    _valid_everywhere(fc)
    assert sum(f["properties"]["measurements"]["n_tiles"] for f in fc["features"]) == above.sum() == 143
    biggest = max(fc["features"], key=lambda f: f["properties"]["measurements"]["n_tiles"])
    assert biggest["properties"]["measurements"]["n_tiles"] == 129
    assert shape(biggest["geometry"]).area == pytest.approx(129 * STRIDE ** 2)


def test_tile_union_is_exact_and_drops_collinear_points():
    img = np.zeros((4, 6), bool)
    img[1:3, 1:5] = True
    g = tile_union(img)
    assert g.wkt == "POLYGON ((1 1, 5 1, 5 3, 1 3, 1 1))" or len(g.exterior.coords) == 5
    assert g.area == 8 and g.is_valid
    assert tile_union(np.zeros((3, 3), bool)).is_empty


@pytest.mark.realdata
def test_real_tcga_slide_regions_are_valid(real_slide, tmp_path):
    """End to end on the real TCGA slide at --mpp 1.0 with the default model (skips without the data)."""
    from wsi_cmaf.infer import InferenceConfig, analyze_slide

    res = analyze_slide(real_slide("jp2k_svs"), mpp=1.0, out=tmp_path / "o",
                        config=InferenceConfig(progress=False, overlay=False))
    fc = json.loads(res.outputs["geojson"].read_text())
    assert fc["features"]
    _valid_everywhere(fc)
