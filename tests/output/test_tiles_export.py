"""Per-tile exports (pandas table, CSV, Parquet, QuPath tile GeoJSON) and open_heatmap (xarray)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import wsi_cmaf
from wsi_cmaf.cli import main
from wsi_cmaf.errors import MissingDependencyError
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.tiles import tile_table, tiles_geojson, write_tiles

ORIGIN = (64, 32)  # level-0 (x, y) of tile (0, 0)'s top-left
STRIDE = 800       # 50 px tiles at 4 µm/px on a 0.25 µm/px slide: 200 µm


def make_store(path: Path) -> HeatmapStore:
    """3 x 4 grid: tissue everywhere but (0, 0); class-1 probability 0.1 * (row * 4 + col)."""
    attrs = {"slide": {"path": "/x/slide.svs", "mpp": [0.25, 0.25]},
             "grid": {"tile_origin_level0": list(ORIGIN), "tile_size": 50, "mpp": 4.0},
             "model": {"name": "m", "weights_sha256": "cd" * 32, "config": {"positive_class": 1}}}
    store = HeatmapStore.open_or_create(path, grid_shape=(3, 4), chunk=(2, 2), class_names=["benign", "Tumor cells"],
                                        identity={"slide_fingerprint": "fp"}, attrs=attrs, um_per_tile=(200.0, 200.0))
    pos = (np.arange(12, dtype=np.float32).reshape(3, 4) / 20).astype(np.float32)
    pos[0, 0] = np.nan
    probs = np.stack([1 - pos, pos])
    for by in range(2):
        for bx in range(2):
            rs, cs = store.block_slices((by, bx))
            store.write_block((by, bx), probs[:, rs, cs])
    tissue = np.isfinite(pos)
    store.write_tissue(tissue, np.where(tissue, 0.75, 0.1).astype(np.float32))
    store.finalize()
    return store


def test_tile_table_columns_and_numbers(tmp_path):
    frame = tile_table(make_store(tmp_path / "s.zarr"))
    assert list(frame.columns) == ["row", "col", "x", "y", "w", "h", "x_um", "y_um", "tissue", "tissue_fraction",
                                   "inside_fraction", "partial", "prob_benign", "prob_Tumor_cells"]
    # a store given no inside fractions holds whole tiles only
    assert (frame["inside_fraction"] == 1.0).all() and not frame["partial"].any()
    assert len(frame) == 11  # tissue tiles only: (0, 0) has none
    t = frame.set_index(["row", "col"]).loc[(2, 3)]
    assert (t["x"], t["y"], t["w"], t["h"]) == (64 + 3 * 800, 32 + 2 * 800, 800, 800)
    # centre in µm: (64 + 3.5 * 800) * 0.25 = 716, (32 + 2.5 * 800) * 0.25 = 508
    assert (t["x_um"], t["y_um"]) == pytest.approx((716.0, 508.0))
    assert t["prob_Tumor_cells"] == pytest.approx(11 / 20) and t["tissue_fraction"] == pytest.approx(0.75)
    assert frame["x"].dtype == np.int64
    everything = tile_table(tmp_path / "s.zarr", tissue_only=False)
    assert len(everything) == 12 and np.isnan(everything.loc[0, "prob_benign"])


def test_tiles_geojson_is_qupath_tiles_with_measurements(tmp_path):
    fc = tiles_geojson(make_store(tmp_path / "s.zarr"))
    assert len(fc["features"]) == 11
    f = next(f for f in fc["features"] if f["properties"]["measurements"]["row"] == 1
             and f["properties"]["measurements"]["col"] == 2)
    assert f["properties"]["objectType"] == "tile"
    assert f["properties"]["measurements"] == {"prob_benign": pytest.approx(1 - 6 / 20),
                                               "prob_Tumor_cells": pytest.approx(6 / 20),
                                               "tissue_fraction": 0.75, "inside_fraction": 1.0,
                                               "row": 1, "col": 2}
    (ring,) = f["geometry"]["coordinates"]
    x0, y0 = 64 + 2 * 800, 32 + 800
    assert ring == [[x0, y0], [x0 + 800, y0], [x0 + 800, y0 + 800], [x0, y0 + 800], [x0, y0]]
    x, y = np.asarray(ring, float).T
    assert 0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) == 800 ** 2  # counter-clockwise
    assert tiles_geojson(tmp_path / "s.zarr", object_type="detection")["features"][0]["properties"]["objectType"] \
        == "detection"


def test_cli_export_tiles_geojson_and_csv(tmp_path, capsys):
    make_store(tmp_path / "s.zarr")
    assert main(["export", "tiles", str(tmp_path / "s.zarr")]) == 0
    out = tmp_path / "s_tiles.geojson"
    fc = json.loads(out.read_text())
    assert len(fc["features"]) == 11 and "11 tissue tiles" in capsys.readouterr().out
    prov = fc["properties"]["provenance"]
    assert prov["model"]["weights_sha256"] == "cd" * 32 and prov["slide"]["fingerprint"] == "fp"
    assert prov["export"]["invocation"]["command_line"].startswith("wsi-cmaf export tiles ")
    assert main(["-q", "export", "tiles", str(tmp_path / "s.zarr"), "--format", "csv",
                 "--out", str(tmp_path / "t.csv")]) == 0
    assert capsys.readouterr().out == ""  # -q before the verb: nothing printed
    frame = pd.read_csv(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(frame, tile_table(tmp_path / "s.zarr"), check_dtype=False)
    assert main(["export", "tiles", str(tmp_path / "nope.zarr")]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        main(["export", "tiles", str(tmp_path / "s.zarr"), "--format", "xlsx"])
    assert exc.value.code == 2
    assert main(["export", "tiles", str(tmp_path / "s.zarr"), "--format", "csv", "--out", str(tmp_path / "q.csv"),
                 "-q"]) == 0  # -q after the sub-verb too
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet_export_round_trips_with_provenance(tmp_path):
    import pyarrow.parquet as pq

    make_store(tmp_path / "s.zarr")
    out = write_tiles(tmp_path / "s.zarr", tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out), tile_table(tmp_path / "s.zarr"))
    meta = pq.read_schema(out).metadata
    assert json.loads(meta[b"wsi_cmaf:provenance"])["export"]["output"] == str(out.absolute())


def test_parquet_without_pyarrow_is_a_named_error(tmp_path, monkeypatch, capsys):
    make_store(tmp_path / "s.zarr")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyarrow" else real_find_spec(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install pyarrow"):
        write_tiles(tmp_path / "s.zarr", tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()
    assert main(["export", "tiles", str(tmp_path / "s.zarr"), "--format", "parquet"]) == 1
    assert "pyarrow" in capsys.readouterr().err


def test_open_heatmap_coordinates_and_names(tmp_path):
    make_store(tmp_path / "s.zarr")
    da = wsi_cmaf.open_heatmap(tmp_path / "s.zarr")
    assert da.dims == ("class", "y", "x") and da.shape == (2, 3, 4)
    assert list(da["class"].values) == ["benign", "Tumor cells"]
    # tile centres in µm: x = (64 + (c + 0.5) * 800) * 0.25 = 116 + 200 c; y = (32 + (r + 0.5) * 800) * 0.25
    np.testing.assert_allclose(da.x.values, [116, 316, 516, 716])
    np.testing.assert_allclose(da.y.values, [108, 308, 508])
    assert da.sel(**{"class": "Tumor cells"}).sel(x=516, y=308).item() == pytest.approx(6 / 20)
    assert not bool(da.tissue.values[0, 0]) and da.attrs["weights_sha256"] == "cd" * 32
    table = tile_table(tmp_path / "s.zarr")
    # the tile table's µm centres are the DataArray's coordinates
    row = table.iloc[5]
    assert da.sel(x=row["x_um"], y=row["y_um"]).sel(**{"class": "benign"}).item() == pytest.approx(row["prob_benign"])
    level1 = wsi_cmaf.open_heatmap(tmp_path / "s.zarr", level=1)
    np.testing.assert_allclose(level1.x.values, [216, 616])  # mean of two tile centres


def test_plain_xarray_opens_level_0_with_the_documented_recipe(tmp_path):
    """Pyramid levels share the NGFF axis names (c, y, x) with other sizes, which NGFF 0.5 requires,
    so plain ``open_dataset`` needs the coarser levels dropped (README recipe)."""
    import warnings

    import xarray as xr

    make_store(tmp_path / "s.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no consolidated metadata: a harmless warning
        ds = xr.open_dataset(tmp_path / "s.zarr", engine="zarr", consolidated=False, drop_variables=["1", "2"])
    assert dict(ds.sizes) == {"c": 2, "y": 3, "x": 4}
    np.testing.assert_allclose(ds["0"].values, wsi_cmaf.open_heatmap(tmp_path / "s.zarr").values)
