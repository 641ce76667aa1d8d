"""Overlay PNG: alignment of heatmap and thumbnail, legend/colour bar/scale bar, missing slide."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread

from wsi_cmaf.cli import main
from wsi_cmaf.errors import OutputError
from wsi_cmaf.output.overlay import _nice_length, overlay, render_overlay
from wsi_cmaf.output.store import HeatmapStore

ROWS, COLS = 30, 40
MPP = 0.5
STRIDE = 400  # 50 px tiles at 4 µm/px on a 0.5 µm/px slide
ORIGIN = (120, 80)


class FakeReader:
    """Implements the part of the SlideReader API the overlay uses."""

    def __init__(self, colour=(230, 200, 220)):
        self.level_dimensions = ((ORIGIN[0] + COLS * STRIDE + 100, ORIGIN[1] + ROWS * STRIDE + 60),)
        self.mpp = (MPP, MPP)
        self.colour = colour
        self.calls: list[float] = []

    def thumbnail(self, mpp: float) -> np.ndarray:
        self.calls.append(mpp)
        w, h = self.level_dimensions[0]
        f = MPP / mpp
        return np.broadcast_to(np.array(self.colour, np.uint8), (round(h * f), round(w * f), 3)).copy()


def make_store(path: Path, *, positive_class=1, weights_note="untrained (random init)") -> HeatmapStore:
    attrs = {"slide": {"path": str(path.parent / "missing.svs"), "mpp": [MPP, MPP]},
             "grid": {"tile_origin_level0": list(ORIGIN), "tile_size": 50, "mpp": 4.0},
             "model": {"name": "cmaf_net", "weights_note": weights_note,
                       "config": {"positive_class": positive_class}}}
    store = HeatmapStore.open_or_create(path, grid_shape=(ROWS, COLS), chunk=(16, 16),
                                        class_names=["benign", "malignant"], identity={},
                                        attrs=attrs, um_per_tile=(200.0, 200.0))
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    tissue = (yy > 2) & (yy < 27) & (xx > 3) & (xx < 36)
    pos = np.where(tissue, 0.05, np.nan).astype(np.float32)
    pos[10:16, 20:30] = 1.0
    probs = np.stack([1 - pos, pos])
    for by in range(store.done.shape[0]):
        for bx in range(store.done.shape[1]):
            if (by, bx) == (1, 0):
                store.mark_failed((by, bx), "corrupt tile")
                continue
            rs, cs = store.block_slices((by, bx))
            store.write_block((by, bx), probs[:, rs, cs])
    store.write_tissue(tissue)
    store.finalize()
    return store


def test_heatmap_and_thumbnail_share_level0_coordinates(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    reader = FakeReader()
    fig = render_overlay(store, reader, max_size=1000)
    ax = fig.axes[0]
    thumb, heat = ax.get_images()
    w0, h0 = reader.level_dimensions[0]
    assert thumb.get_extent() == pytest.approx([0, w0, h0, 0])
    assert heat.get_extent() == pytest.approx(
        [ORIGIN[0], ORIGIN[0] + COLS * STRIDE, ORIGIN[1] + ROWS * STRIDE, ORIGIN[1]])
    assert reader.calls == [pytest.approx(max(w0, h0) * MPP / 1000)]
    assert heat.get_array().mask.sum() == np.isnan(store.probabilities()[1]).sum()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "tissue outline"
    assert legend[1].startswith("p(malignant) ≥ 0.5: 60 tiles")
    assert legend[2] == "failed blocks (1)"
    assert "UNTRAINED" in ax.get_title()
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "p(malignant)"  # colour bar


def test_overlay_png_shows_heatmap_colours(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    out = overlay(store, FakeReader(colour=(0, 255, 0)), tmp_path / "o.png", alpha=1.0, cmap="viridis")
    img = (imread(out)[..., :3] * 255).round()
    assert img.shape[1] == 1500  # 10 in at 150 dpi
    top = np.array(colormaps["viridis"](1.0)[:3]) * 255
    low = np.array(colormaps["viridis"](0.05)[:3]) * 255
    def count(c):
        return int((np.abs(img - c).max(axis=-1) < 6).sum())
    # the p=1 block (60 tiles) is smaller than the p=0.05 tissue; the colour bar adds a little of each
    assert 0 < count(top) < count(low)
    assert count(np.array([0, 255, 0])) > 1000  # thumbnail visible outside tissue


def test_default_class_follows_model_config(tmp_path):
    store = make_store(tmp_path / "s.zarr", positive_class=0, weights_note="trained on X")
    fig = render_overlay(store, FakeReader())
    assert fig.axes[1].get_ylabel() == "p(benign)" and "UNTRAINED" not in fig.axes[0].get_title()
    fig = render_overlay(store, FakeReader(), class_index=1)
    assert fig.axes[1].get_ylabel() == "p(malignant)"


def test_missing_slide_draws_heatmap_alone(tmp_path, caplog):
    make_store(tmp_path / "s.zarr")
    with caplog.at_level(logging.WARNING):
        out = overlay(tmp_path / "s.zarr")  # recorded slide path does not exist
    assert out == tmp_path / "s_overlay.png" and out.stat().st_size > 10_000
    assert "drawing the heatmap alone" in caplog.text
    fig = render_overlay(HeatmapStore.open(tmp_path / "s.zarr"), tmp_path / "nope.svs")
    ax = fig.axes[0]
    assert len(ax.get_images()) == 1
    assert any("heatmap only" in t.get_text() for t in ax.texts)


def test_cli_overlay(tmp_path, capsys):
    make_store(tmp_path / "s.zarr")
    out = tmp_path / "cli.png"
    assert main(["overlay", str(tmp_path / "s.zarr"), "--out", str(out), "--threshold", "0.9"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["overlay", str(tmp_path / "nothing.zarr")]) == 2
    assert main(["overlay", str(tmp_path / "s.zarr"), "--cmap", "no-such-map"]) == 2
    assert "no-such-map" in capsys.readouterr().err


@pytest.mark.parametrize("span, nice", [(2.3, 2.0), (0.07, 0.05), (7.0, 5.0), (10.0, 10.0), (0.0011, 0.001)])
def test_scale_bar_length(span, nice):
    assert _nice_length(span) == pytest.approx(nice)


def test_given_thumbnail_is_drawn_without_reading_the_slide(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    reader = FakeReader()
    picture = np.zeros((300, 420, 3), np.uint8)
    picture[:, :, 1] = 255
    fig = render_overlay(store, reader, thumbnail=picture)
    assert reader.calls == []
    thumb = fig.axes[0].get_images()[0]
    np.testing.assert_array_equal(thumb.get_array(), picture)
    w0, h0 = reader.level_dimensions[0]
    assert thumb.get_extent() == pytest.approx([0, w0, h0, 0])
    with pytest.raises(OutputError, match="RGB"):
        render_overlay(store, reader, thumbnail=picture[..., 0])


def test_background_from_tissue_thumbnail():
    from wsi_cmaf.output.overlay import background_from

    assert background_from(np.zeros((500, 1000, 3), np.uint8)) is None  # coarser than the map: read anew
    same = np.zeros((1000, 1300, 3), np.uint8)
    assert background_from(same) is same  # about figure-sized: as it is
    big = np.random.default_rng(0).integers(0, 256, (2500, 3125, 3), dtype=np.uint8)
    small = background_from(big)
    assert small.shape == (1250, 1563, 3)  # reduced 2x, still at least 1,500 px wide
    np.testing.assert_allclose(small[:10, :10].astype(float),
                               big[:20, :20].reshape(10, 2, 10, 2, 3).mean(axis=(1, 3)), atol=0.51)
