"""HeatmapStore: chunk-per-block writes, flags, resume/overwrite safety, pyramid, NGFF 0.5 layout."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi_cmaf.errors import OutputError, OutputExistsError, StoreFormatError, StoreMismatchError
from wsi_cmaf.output.store import HeatmapStore

CLASSES = ["benign", "malignant"]
IDENTITY = {"slide_fingerprint": "abc123", "model": "cmaf_net", "weights_sha256": "00ff",
            "model_config": {"num_classes": 2, "spacing_um_px": 4.0}, "grid": {"shape": [50, 45]}}
ATTRS = {"slide": {"path": "/data/slide.svs", "size": [18000, 20000], "mpp": [0.5, 0.5],
                   "mpp_source": "vendor", "backend": "openslide"},
         "grid": {"tile_origin_level0": [100, 40], "tile_size": 50, "mpp": 4.0},
         "model": {"name": "cmaf_net", "weights_sha256": "00ff"}}


def make(path: Path, *, shape=(50, 45), chunk=(8, 8), identity=None, attrs=None, **kw) -> HeatmapStore:
    return HeatmapStore.open_or_create(
        path, grid_shape=shape, chunk=chunk, class_names=CLASSES, identity=identity or IDENTITY,
        attrs=attrs or ATTRS, um_per_tile=(200.0, 200.0), **kw)


def random_probs(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.random((2,) + shape, dtype=np.float32)
    p[:, rng.random(shape) < 0.3] = np.nan  # background tiles
    return p


def fill(store: HeatmapStore, probs: np.ndarray, blocks) -> None:
    for b in blocks:
        rs, cs = store.block_slices(b)
        store.write_block(b, probs[:, rs, cs])


def all_blocks(store: HeatmapStore) -> list[tuple[int, int]]:
    return [(by, bx) for by in range(store.done.shape[0]) for bx in range(store.done.shape[1])]


def test_threaded_writers_on_distinct_chunks_equal_serial(tmp_path):
    probs = random_probs((50, 45))
    serial = make(tmp_path / "serial.zarr")
    fill(serial, probs, all_blocks(serial))
    threaded = make(tmp_path / "threaded.zarr")
    blocks = all_blocks(threaded)
    random.Random(1).shuffle(blocks)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda b: fill(threaded, probs, [b]), blocks))
    a = HeatmapStore.open(tmp_path / "serial.zarr").probabilities()
    b = HeatmapStore.open(tmp_path / "threaded.zarr").probabilities()
    np.testing.assert_array_equal(a, probs)  # NaN positions compare equal
    np.testing.assert_array_equal(b, a)
    assert HeatmapStore.open(tmp_path / "threaded.zarr").done.all()


def test_write_block_checks_shape_and_bounds(tmp_path):
    store = make(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        store.write_block((0, 0), np.zeros((2, 8, 7), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 2, 5\)"):  # edge block: 50 = 6*8 + 2, 45 = 5*8 + 5
        store.write_block((6, 5), np.zeros((2, 8, 8), np.float32))
    store.write_block((6, 5), np.full((2, 2, 5), 0.25, np.float32))
    with pytest.raises(IndexError):
        store.write_block((7, 0), np.zeros((2, 8, 8), np.float32))
    assert store.done.sum() == 1 and store.done[6, 5]
    with pytest.raises(ValueError):
        store.done[0, 0] = True  # the cached flags are read-only for callers


def test_flags_and_errors_persist_and_retry_clears_failure(tmp_path):
    store = make(tmp_path / "s.zarr")
    probs = random_probs((50, 45), seed=3)
    fill(store, probs, [(0, 0), (1, 2)])
    store.mark_failed((2, 3), "corrupt JPEG tile at (1600, 2400)")
    store.mark_failed((4, 4), "read timeout")

    again = HeatmapStore.open(tmp_path / "s.zarr")
    assert set(zip(*np.nonzero(again.done))) == {(0, 0), (1, 2)}
    assert set(zip(*np.nonzero(again.failed))) == {(2, 3), (4, 4)}
    assert again.errors == {(2, 3): "corrupt JPEG tile at (1600, 2400)", (4, 4): "read timeout"}
    untouched = again.probabilities()[:, 16:24, 24:32]
    assert np.isnan(untouched).all()  # blocks never written read back as fill value

    resumed = make(tmp_path / "s.zarr")  # same identity -> resume
    fill(resumed, probs, [(2, 3)])
    final = HeatmapStore.open(tmp_path / "s.zarr")
    assert final.done[2, 3] and not final.failed[2, 3] and final.failed[4, 4]
    assert final.errors == {(4, 4): "read timeout"}


def test_resume_keeps_data_and_updates_attrs(tmp_path):
    probs = random_probs((50, 45), seed=5)
    store = make(tmp_path / "s.zarr")
    fill(store, probs, [(0, 0), (3, 3)])
    attrs = {**ATTRS, "inference": {"batch_size": 64}}
    resumed = make(tmp_path / "s.zarr", attrs=attrs)
    assert resumed.done.sum() == 2
    np.testing.assert_array_equal(resumed.probabilities()[:, :8, :8], probs[:, :8, :8])
    assert HeatmapStore.open(tmp_path / "s.zarr").attrs["inference"] == {"batch_size": 64}


def test_identity_or_layout_mismatch_is_refused(tmp_path):
    make(tmp_path / "s.zarr")
    other = {**IDENTITY, "weights_sha256": "beef", "model_config": {"num_classes": 2, "spacing_um_px": 2.0}}
    with pytest.raises(StoreMismatchError) as err:
        make(tmp_path / "s.zarr", identity=other)
    msg = str(err.value)
    assert "identity.weights_sha256" in msg and "identity.model_config.spacing_um_px" in msg
    assert "identity.slide_fingerprint" not in msg
    with pytest.raises(StoreMismatchError, match="layout.chunk"):
        make(tmp_path / "s.zarr", chunk=(16, 16))


def test_existing_store_without_resume_raises(tmp_path):
    make(tmp_path / "s.zarr")
    with pytest.raises(OutputExistsError):
        make(tmp_path / "s.zarr", resume=False)


def test_overwrite_replaces_a_store(tmp_path):
    store = make(tmp_path / "s.zarr")
    fill(store, random_probs((50, 45)), [(0, 0)])
    store.mark_failed((1, 1), "x")
    fresh = make(tmp_path / "s.zarr", identity={**IDENTITY, "model": "other"}, overwrite=True)
    assert not fresh.done.any() and not fresh.failed.any() and fresh.errors == {}
    assert np.isnan(fresh.probabilities()).all()
    assert fresh.identity["model"] == "other"


@pytest.mark.parametrize("kind", ["file", "folder", "foreign_zarr"])
def test_overwrite_never_deletes_other_content(tmp_path, kind):
    target = tmp_path / "out.zarr"
    if kind == "file":
        target.write_text("precious")
        keep = target
    elif kind == "folder":
        target.mkdir()
        keep = target / "notes.txt"
        keep.write_text("precious")
    else:
        zarr.create_group(str(target), zarr_format=3, attributes={"ome": {"version": "0.5"}})
        zarr.open_group(str(target), mode="r+").create_array("0", shape=(4,), dtype="uint8")
        keep = target / "zarr.json"
    before = keep.read_bytes()
    for kwargs in ({}, {"overwrite": True}):
        with pytest.raises(OutputError, match="not a wsi-cmaf heatmap store"):
            make(target, **kwargs)
    assert keep.read_bytes() == before
    if kind == "foreign_zarr":
        assert (target / "0" / "zarr.json").is_file()


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "s.zarr").mkdir()
    assert make(tmp_path / "s.zarr").done.shape == (7, 6)


def test_interrupted_creation_is_recreated(tmp_path):
    store = make(tmp_path / "s.zarr")
    fill(store, random_probs((50, 45)), [(0, 0)])
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    meta = dict(root.attrs["wsi_cmaf"])
    meta["layout_complete"] = False  # what a crash between group and arrays leaves
    root.attrs["wsi_cmaf"] = meta
    with pytest.raises(OutputError, match="incomplete"):
        HeatmapStore.open(tmp_path / "s.zarr")
    again = make(tmp_path / "s.zarr")
    assert not again.done.any()


def _reference_pool(a: np.ndarray) -> np.ndarray:
    """Slow, obviously-correct 2x2 NaN-mean pooling for comparison."""
    c, h, w = a.shape
    out = np.full((c, (h + 1) // 2, (w + 1) // 2), np.nan, np.float32)
    for k in range(c):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                win = a[k, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                win = win[np.isfinite(win)]
                if win.size:
                    out[k, i, j] = win.mean()
    return out


def test_finalize_builds_nan_mean_levels(tmp_path):
    probs = random_probs((50, 45), seed=7)
    probs[:, 0:4, 0:4] = np.nan  # an all-NaN 2x2 window must stay NaN
    store = make(tmp_path / "s.zarr")
    fill(store, probs, all_blocks(store))
    tissue = np.isfinite(probs[0])
    store.write_tissue(tissue)
    store.finalize(levels=3, extra_attrs={"timings": {"inference": 1.5}})
    lvl1, lvl2 = store.probabilities(1), store.probabilities(2)
    assert lvl1.shape == (2, 25, 23) and lvl2.shape == (2, 13, 12)
    np.testing.assert_allclose(lvl1, _reference_pool(probs), rtol=1e-6)
    np.testing.assert_allclose(lvl2, _reference_pool(_reference_pool(probs)), rtol=1e-6)
    assert np.isnan(lvl1[:, 0:2, 0:2]).all()
    expected_t1 = np.pad(tissue, ((0, 0), (0, 1))).reshape(25, 2, 23, 2).any(axis=(1, 3))
    np.testing.assert_array_equal(store.tissue(1), expected_t1)
    assert store.attrs["timings"] == {"inference": 1.5} and store.finalized
    with pytest.raises(ValueError):
        store.finalize(levels=2)
    store.finalize(levels=4)
    assert store.n_levels == 4 and store.probabilities(3).shape == (2, 7, 6)
    store.finalize(levels=3)  # a shallower pyramid leaves no stale level behind
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert sorted(root.array_keys()) == ["0", "1", "2"]
    assert sorted(root["labels/tissue"].array_keys()) == ["0", "1", "2"]


def test_plain_zarr_sees_ngff_05_multiscales(tmp_path):
    store = make(tmp_path / "s.zarr")
    probs = random_probs((50, 45), seed=9)
    fill(store, probs, all_blocks(store))
    store.write_tissue(np.isfinite(probs[0]))
    store.finalize()

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")  # no wsi_cmaf code from here on
    doc = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert doc["zarr_format"] == 3 and doc["node_type"] == "group"
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5" and "version" not in ome["multiscales"][0]
    (ms,) = ome["multiscales"]
    axes = ms["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"]
    assert [a["type"] for a in axes] == ["channel", "space", "space"]
    assert all(a["unit"] == "micrometer" for a in axes[1:])
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    # tile (0, 0) centre: origin 100/40 px + half a 400 px tile (50 px at 4 µm/px on a 0.5 µm/px slide)
    centre_y, centre_x = (40 + 200) * 0.5, (100 + 200) * 0.5
    for level, ds in enumerate(ms["datasets"]):
        scale, translation = ds["coordinateTransformations"]
        assert scale == {"type": "scale", "scale": [1.0, 200.0 * 2 ** level, 200.0 * 2 ** level]}
        shift = (2 ** level - 1) / 2 * 200.0
        assert translation == {"type": "translation", "translation": [0.0, centre_y + shift, centre_x + shift]}
        arr = root[ds["path"]]
        assert arr.metadata.dimension_names == ("c", "y", "x")
        assert arr.dtype == np.float32 and arr.shape[0] == 2
    assert root["0"].chunks == (2, 8, 8)
    codecs = json.loads((tmp_path / "s.zarr" / "0" / "zarr.json").read_text())["codecs"]
    assert any(c["name"] == "blosc" for c in codecs)
    np.testing.assert_array_equal(root["0"][...], probs)
    assert [c["label"] for c in ome["omero"]["channels"]] == CLASSES

    labels = root["labels"].attrs["ome"]
    assert labels == {"version": "0.5", "labels": ["tissue"]}
    tissue = root["labels/tissue"]
    t_ome = tissue.attrs["ome"]
    assert t_ome["version"] == "0.5" and t_ome["image-label"]["source"] == {"image": "../../"}
    assert len(t_ome["multiscales"][0]["datasets"]) == len(ms["datasets"])  # spec: same number of levels
    assert np.issubdtype(tissue["0"].dtype, np.integer) and tissue["0"].shape == (1, 50, 45)

    meta = root.attrs["wsi_cmaf"]
    assert meta["identity"]["weights_sha256"] == "00ff" and meta["slide"]["mpp_source"] == "vendor"
    assert root["wsi_cmaf/done"].shape == (7, 6) and root["wsi_cmaf/done"][...].all()
    assert root["wsi_cmaf/done"].chunks == (1, 1)


def test_failed_tiles_mask_per_block_and_cleared_by_a_good_retry(tmp_path):
    store = make(tmp_path / "s.zarr")
    probs = random_probs((50, 45))
    rs, cs = store.block_slices((1, 2))
    bad = np.zeros((rs.stop - rs.start, cs.stop - cs.start), bool)
    bad[2, 3] = bad[5, 0] = True
    chunk = probs[:, rs, cs].copy()
    chunk[:, bad] = np.nan
    store.write_block((1, 2), chunk, bad, "Jpeg8Error: Unsupported marker type 0x3f")
    store.write_block((0, 0), probs[:, :8, :8])  # a clean block writes no tile-mask chunk
    again = HeatmapStore.open(tmp_path / "s.zarr")
    assert again.done[1, 2] and not again.failed[1, 2]
    assert again.failed_tiles.sum() == 2 and again.failed_tiles[8 + 2, 16 + 3] and again.failed_tiles[8 + 5, 16]
    assert again.block_has_failed_tiles((1, 2)) and not again.block_has_failed_tiles((0, 0))
    assert again.tile_errors == {(1, 2): "Jpeg8Error: Unsupported marker type 0x3f"}
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    arr = root["wsi_cmaf/failed_tiles"]  # a plain zarr array, one pixel per tile like level 0
    assert arr.shape == (50, 45) and arr.chunks == (8, 8) and arr.metadata.dimension_names == ("y", "x")
    assert root.attrs["ome"]["version"] == "0.5"  # the NGFF image metadata is untouched
    with pytest.raises(ValueError, match="failed-tile mask of shape"):
        store.write_block((1, 2), chunk, bad[:2])
    store.write_block((1, 2), probs[:, rs, cs])  # the retry decoded everything
    again = HeatmapStore.open(tmp_path / "s.zarr")
    assert not again.failed_tiles.any() and again.tile_errors == {}


def test_run_inputs_roundtrip_and_old_stores_are_refused(tmp_path):
    store = make(tmp_path / "s.zarr")
    store.write_inputs({"tissue": {"mpp": 8.0, "complete": True}})
    store.write_inputs({"stain": {"method": "macenko", "fit": None, "warning": "w"}})
    bg = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    store.write_background(bg)
    again = HeatmapStore.open(tmp_path / "s.zarr")
    assert again.inputs() == {"tissue": {"mpp": 8.0, "complete": True},
                              "stain": {"method": "macenko", "fit": None, "warning": "w"}}
    np.testing.assert_array_equal(again.background(), bg)
    # a store of the first format, written before the failed-tile mask existed: refused both ways
    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")["wsi_cmaf"].__delitem__("failed_tiles")
    _set_format_version(tmp_path / "s.zarr", 1)
    with pytest.raises(StoreFormatError, match="older wsi-cmaf"):
        HeatmapStore.open(tmp_path / "s.zarr")
    with pytest.raises(StoreFormatError, match="older wsi-cmaf"):
        make(tmp_path / "s.zarr")
    assert make(tmp_path / "s.zarr", overwrite=True).failed_tiles.shape == (50, 45)


def _set_format_version(path: Path, version: object) -> None:
    """Hand-edit a store's root attributes: ``version`` None removes ``format_version``."""
    root = zarr.open_group(str(path), mode="r+")
    meta = dict(root.attrs["wsi_cmaf"])
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    root.attrs["wsi_cmaf"] = meta


@pytest.mark.parametrize("version,origin", [(1, "an older wsi-cmaf (store format 1)"),
                                            (None, "an older wsi-cmaf (store format unversioned)"),
                                            ("2", "an older wsi-cmaf (store format '2')"),
                                            (3, "a newer wsi-cmaf (store format 3)")])
def test_a_store_of_another_format_version_is_refused_until_overwritten(tmp_path, version, origin):
    path = tmp_path / "s.zarr"
    fill(make(path), random_probs((50, 45)), [(0, 0)])
    assert HeatmapStore.open(path)._root.attrs["wsi_cmaf"]["format_version"] == 2
    _set_format_version(path, version)
    expected = f"{path} was written by {origin}; this wsi-cmaf reads store format 2 only"
    for opening in (lambda: HeatmapStore.open(path), lambda: HeatmapStore.open(path, "r+"), lambda: make(path),
                    lambda: make(path, resume=False)):
        with pytest.raises(StoreFormatError) as err:
            opening()
        assert str(err.value).startswith(expected) and "overwrite=True (CLI: --overwrite)" in str(err.value)
        assert isinstance(err.value, StoreMismatchError)  # caught wherever a mismatched store is
    fresh = make(path, overwrite=True)
    assert not fresh.done.any() and fresh._root.attrs["wsi_cmaf"]["format_version"] == 2


def test_cli_verbs_name_an_old_store(tmp_path, capsys):
    from wsi_cmaf.cli import main

    path = tmp_path / "s.zarr"
    fill(make(path), random_probs((50, 45)), [(0, 0)])
    _set_format_version(path, 1)
    for argv in (["verify", str(path)], ["export", "tiles", str(path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "written by an older wsi-cmaf" in err and "--overwrite" in err, argv
