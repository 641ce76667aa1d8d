"""Viewer layers (wsi_cmaf.viz.layers) without napari: µm geometry of slide and heatmap, pinned by hand.

The store is made by hand on a synthetic slide of 2048 x 1536 px at 0.5 µm/px (levels 1, 2, 4)
with tile (0, 0)'s top-left at level-0 (64, 32) and 50 px tiles at 4 µm/px = 200 µm = 400 px.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.stores import GRID, SLIDE_MPP, make_store
from wsi_cmaf.errors import MissingDependencyError, OutputError
from wsi_cmaf.slide.reader import open_slide
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.viz.layers import heatmap_colormap, layer_data, ngff_transform


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "s.tiff"
    write_synthetic_slide(path, 2048, 1536, SLIDE_MPP, tile=256, downsamples=(1, 2, 4), save_mask=False)
    return path


def by_name(layers):
    return {kw["name"]: (data, kw, kind) for data, kw, kind in layers}


def test_store_alone_finds_its_slide_and_places_both_in_um(tmp_path, slide):
    layers = by_name(layer_data(store=make_store(tmp_path / "h.zarr", slide)))
    assert set(layers) == {"s.tiff", "tissue tiles", "benign probability", "malignant probability"}
    data, kw, kind = layers["s.tiff"]
    assert kind == "image" and kw["rgb"] and kw["multiscale"]
    assert [d.shape for d in data] == [(1536, 2048, 3), (768, 1024, 3), (384, 512, 3)]
    assert kw["scale"] == (0.5, 0.5)
    assert kw["translate"] == (0.25, 0.25)  # centre of pixel (0, 0): the slide's corner is at 0 µm
    # the slide's pixels come through the lazy arrays: level 2 equals a direct read
    with open_slide(slide) as r:
        direct = r.read_region((0, 0), 2, (512, 384))
    np.testing.assert_array_equal(np.asarray(data[2]), direct)

    _, hk, _ = layers["malignant probability"]
    assert hk["scale"] == (200.0, 200.0)
    # centre of tile (0, 0) = (origin + half a tile) * µm/px: x (64 + 200) * 0.5, y (32 + 200) * 0.5
    assert hk["translate"] == (116.0, 132.0)
    assert hk["visible"] and not layers["benign probability"][1]["visible"]
    assert hk["contrast_limits"] == (0.0, 1.0)
    # a heatmap pixel covers its tile: the left edge of tile column 2 is at level-0 x 64 + 2 * 400 px
    left_edge_um = hk["translate"][1] + (2 - 0.5) * hk["scale"][1]
    assert left_edge_um == (64 + 2 * 400) * SLIDE_MPP
    assert layers["tissue tiles"][1]["translate"] == (116.0, 132.0)


def test_heatmap_values_and_nan_kept(tmp_path, slide):
    layers = by_name(layer_data(store=make_store(tmp_path / "h.zarr", slide)))
    probs = layers["malignant probability"][0]
    assert probs.shape == GRID and np.isnan(probs[0, 0])
    assert probs[2, 3] == pytest.approx(0.23)
    tissue = layers["tissue tiles"][0]
    assert tissue.dtype == np.uint8 and tissue[0, 0] == 0 and tissue[2, 3] == 1


def test_slide_and_store_given_and_class_choice(tmp_path, slide):
    store = make_store(tmp_path / "h.zarr", None)  # the store does not know the slide
    layers = by_name(layer_data(slide, store, classes=["malignant"]))
    assert set(layers) == {"s.tiff", "tissue tiles", "malignant probability"}
    with pytest.raises(OutputError, match="not in the store's classes"):
        layer_data(store=store, classes=["stroma"])


def test_store_whose_slide_is_gone_shows_heatmap_only(tmp_path, caplog):
    store = make_store(tmp_path / "h.zarr", tmp_path / "moved_away.svs")
    with caplog.at_level(logging.WARNING):
        layers = by_name(layer_data(store=store))
    assert "s.tiff" not in layers and "malignant probability" in layers
    assert "not there any more" in caplog.text


def test_slide_without_mpp_takes_the_analysis_override(tmp_path, slide):
    # a store made with --mpp: the slide is drawn with the µm/px the heatmap was computed with
    store = make_store(tmp_path / "h.zarr", slide, mpp_source="override")
    data, kw, _ = by_name(layer_data(store=store))["s.tiff"]
    assert kw["scale"] == (0.5, 0.5)
    # an explicit mpp wins for a slide shown alone
    _, kw, _ = layer_data(slide, mpp=2.0)[0]
    assert kw["scale"] == (2.0, 2.0) and kw["translate"] == (1.0, 1.0)


def test_wrong_slide_or_mpp_is_warned_about(tmp_path, slide, caplog):
    store = make_store(tmp_path / "h.zarr", slide, identity={"slide_fingerprint": "size=1;sha256=00"})
    with caplog.at_level(logging.WARNING), open_slide(slide, mpp=0.25) as reader:
        layers = layer_data(reader, store)
    assert "different file fingerprint" in caplog.text
    assert "differs from the (0.5, 0.5) the heatmap was made with" in caplog.text
    assert layers[0][1]["scale"] == (0.25, 0.25)  # shown as asked, but the user was told


def test_ngff_transform_composes_dataset_and_multiscale_transforms():
    ome = {"multiscales": [{
        "axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 2.0, 3.0]}, {"type": "translation", "translation": [0, 5.0, 7.0]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 10.0, 10.0]}]}]}
    # x' = 10 * (3 x + 7): scale 30, translate 70
    assert ngff_transform(ome) == ((20.0, 30.0), (50.0, 70.0))
    with pytest.raises(OutputError, match="no dataset"):
        ngff_transform(ome, "3")


def test_nothing_to_show_and_colormap():
    with pytest.raises(OutputError, match="nothing to show"):
        layer_data()
    cmap = heatmap_colormap()
    assert cmap["colors"].shape == (256, 4)
    alpha = cmap["colors"][:, 3]
    assert alpha[0] == pytest.approx(0.08) and alpha[-1] == pytest.approx(1.0) and np.all(np.diff(alpha) >= 0)


def test_show_without_napari_names_the_extra(monkeypatch):
    import builtins

    from wsi_cmaf.viz import viewer

    real_import = builtins.__import__

    def no_napari(name, *args, **kwargs):
        if name == "napari" or name.startswith("napari."):
            raise ImportError("No module named 'napari'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_napari)
    with pytest.raises(MissingDependencyError, match=r"pip install 'wsi-cmaf\[napari\]'"):
        viewer.show(store="x.zarr")
