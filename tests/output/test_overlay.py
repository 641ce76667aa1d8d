"""Overlay PNG (numpy + PIL): alignment with level-0 coordinates, colours, outline from the tissue
mask, thresholded mode, "not diagnostic" banner, provenance text chunks, missing slide, speed."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_cmaf.cli import main
from wsi_cmaf.errors import OutputError
from wsi_cmaf.output import _draw as D
from wsi_cmaf.output._png import encode_png
from wsi_cmaf.output.overlay import _nice_length, background_from, overlay, render_overlay
from wsi_cmaf.output.store import HeatmapStore

ROWS, COLS = 30, 40
MPP = 0.5
STRIDE = 400  # 50 px tiles at 4 µm/px on a 0.5 µm/px slide
ORIGIN = (120, 80)
SLIDE_W, SLIDE_H = ORIGIN[0] + COLS * STRIDE + 100, ORIGIN[1] + ROWS * STRIDE + 60  # 16220 x 12140


class FakeReader:
    """Implements the part of the SlideReader API the overlay uses."""

    def __init__(self, colour=(230, 200, 220)):
        self.level_dimensions = ((SLIDE_W, SLIDE_H),)
        self.mpp = (MPP, MPP)
        self.colour = colour
        self.calls: list[float] = []

    def thumbnail(self, mpp: float) -> np.ndarray:
        self.calls.append(mpp)
        w, h = self.level_dimensions[0]
        f = MPP / mpp
        return np.broadcast_to(np.array(self.colour, np.uint8), (round(h * f), round(w * f), 3)).copy()


def make_store(path: Path, *, positive_class=1, weights_note="untrained (random init)", mask=True) -> HeatmapStore:
    attrs = {"slide": {"path": str(path.parent / "missing.svs"), "mpp": [MPP, MPP]},
             "grid": {"tile_origin_level0": list(ORIGIN), "tile_size": 50, "mpp": 4.0},
             "model": {"name": "cmaf_net", "weights_note": weights_note, "weights_sha256": "ab" * 32,
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
    if mask:
        # slide-level mask at 8 µm/px (16 level-0 px): a disc, centre (8000, 6000) level-0, radius 4000
        my, mx = np.mgrid[0: SLIDE_H // 16, 0: SLIDE_W // 16]
        store.write_tissue_mask(((mx + 0.5) * 16 - 8000) ** 2 + ((my + 0.5) * 16 - 6000) ** 2 < 4000 ** 2, 8.0)
    store.finalize()
    return store


def pixel(picture, x0: float, y0: float) -> np.ndarray:
    """RGB of the canvas pixel showing level-0 point (x0, y0)."""
    cx, cy = picture.to_canvas(x0, y0)
    return np.asarray(picture.image)[int(cy), int(cx)].astype(int)


def test_heatmap_thumbnail_and_legend_share_level0_coordinates(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    reader = FakeReader()
    pic = render_overlay(store, reader, max_size=1000, alpha=1.0)
    assert pic.extent == (0.0, SLIDE_W, SLIDE_H, 0.0)
    x0, y0, x1, y1 = pic.map_box
    assert (x1 - x0, y1 - y0) == (1000, round(1000 * SLIDE_H / SLIDE_W))  # 16220 x 12140 -> 1000 x 748
    assert reader.calls == [pytest.approx(SLIDE_W * MPP / 1000)]
    lut = D.colour_lut(D.DEFAULT_CMAP)
    # centre of tile (12, 25): p = 1 at full opacity -> the ramp's top colour exactly
    np.testing.assert_array_equal(pixel(pic, ORIGIN[0] + 25.5 * STRIDE, ORIGIN[1] + 12.5 * STRIDE), lut[255])
    # tile (5, 10): p = 0.05, opacity 0.08 + 0.92 * 0.05² = 0.0823 over the thumbnail colour
    expect = np.array((230, 200, 220)) + (lut[13].astype(float) - (230, 200, 220)) * (0.08 + 0.92 * 0.05 ** 2)
    np.testing.assert_allclose(pixel(pic, ORIGIN[0] + 10.5 * STRIDE, ORIGIN[1] + 5.5 * STRIDE), expect, atol=1)
    # outside the grid (slide margin right of the tiles) and a no-tissue tile: the thumbnail untouched
    np.testing.assert_array_equal(pixel(pic, SLIDE_W - 30, SLIDE_H / 2), (230, 200, 220))
    np.testing.assert_array_equal(pixel(pic, ORIGIN[0] + 1.5 * STRIDE, ORIGIN[1] + 1.5 * STRIDE), (230, 200, 220))
    assert pic.legend[0] == "tissue outline (tissue mask)" and pic.outline_source == "tissue mask"
    assert pic.legend[1] == "p ≥ 0.5: 60 tiles" and pic.n_positive == 60
    assert pic.legend[2] == "failed blocks (1)"
    assert pic.banner and "UNTRAINED" in pic.banner and "NOT DIAGNOSTIC" in pic.banner


def test_outline_follows_the_tissue_mask_not_the_tiles(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    pic = render_overlay(store, FakeReader(colour=(255, 255, 255)), max_size=1000, alpha=0.0)
    img = np.asarray(pic.image).astype(int)
    line = (np.abs(img - D.TISSUE_LINE).max(axis=-1) < 3)
    # the disc's edge on the horizontal through its centre: x = 8000 ± 4000 level-0
    for x_edge in (4000, 12000):
        cx, cy = pic.to_canvas(x_edge, 6000)
        assert line[int(cy), int(cx) - 3: int(cx) + 4].any(), x_edge
    # the tissue tiles' footprint edge (tile column 4 starts at x = 120 + 4 * 400 = 1720) has no line
    cx, cy = pic.to_canvas(1720, 6000)
    assert not line[int(cy), int(cx) - 3: int(cx) + 4].any()
    # an old store without a mask falls back to the tiles' outline, and says so
    old = make_store(tmp_path / "old.zarr", mask=False)
    assert render_overlay(old, FakeReader()).legend[0] == "tissue tiles (outline)"


def test_threshold_mode_colours_only_tiles_above(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    pic = render_overlay(store, FakeReader(), max_size=800, alpha=1.0, mode="threshold", threshold=0.9)
    # 55 % of alpha = 1: (230, 200, 220) + ((0, 215, 80) - (230, 200, 220)) * 0.55 = (103.5, 208.25, 143)
    np.testing.assert_allclose(pixel(pic, ORIGIN[0] + 25.5 * STRIDE, ORIGIN[1] + 12.5 * STRIDE), (103.5, 208.25, 143),
                               atol=1)
    np.testing.assert_array_equal(pixel(pic, ORIGIN[0] + 10.5 * STRIDE, ORIGIN[1] + 5.5 * STRIDE), (230, 200, 220))
    assert pic.legend[1] == "p ≥ 0.9: 60 tiles"
    with pytest.raises(OutputError, match="mode"):
        render_overlay(store, FakeReader(), mode="contour")


def test_ramp_avoids_stain_hues_and_rises_in_luminance():
    lut = D.colour_lut(D.DEFAULT_CMAP).astype(float)
    luminance = lut @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(luminance) >= -0.5).all() and luminance[-1] > 3 * luminance[0]
    hsv = np.asarray(Image.fromarray(lut[None].astype(np.uint8)).convert("HSV"))[0].astype(float)
    hue_deg = hsv[:, 0] * 360 / 255
    assert ((hue_deg > 45) & (hue_deg < 170)).all()  # yellow..green..teal: never pink/purple (250-360°)
    # opacity rises with p: 8 % of alpha at 0, alpha at 1, NaN transparent
    np.testing.assert_allclose(D.opacity(np.array([0.0, 0.5, 1.0, np.nan]), 0.5), [0.04, 0.5 * (0.08 + 0.23), 0.5, 0])


def test_default_class_follows_model_config_and_banner_follows_note(tmp_path):
    store = make_store(tmp_path / "s.zarr", positive_class=0, weights_note="trained on X")
    pic = render_overlay(store, FakeReader())
    assert pic.class_name == "benign" and pic.banner is None
    assert render_overlay(store, FakeReader(), class_index=1).class_name == "malignant"
    synth = make_store(tmp_path / "t.zarr", weights_note="trained on 9 SYNTHETIC slides only")
    assert "SYNTHETIC" in render_overlay(synth, FakeReader()).banner


def test_png_carries_provenance_text_chunks(tmp_path):
    store = make_store(tmp_path / "s.zarr", weights_note="trained on 9 SYNTHETIC slides only")
    out = overlay(store, FakeReader(), tmp_path / "o.png")
    with Image.open(out) as im:
        text = dict(im.text)
        assert im.size[0] > 1000 and im.mode == "RGB"
    prov = json.loads(text["wsi_cmaf:provenance"])
    assert prov["model"] == {"name": "cmaf_net", "weights_sha256": "ab" * 32,
                             "weights_note": "trained on 9 SYNTHETIC slides only"}
    assert prov["store"] == str((tmp_path / "s.zarr").absolute())
    assert prov["export"]["output"] == str(out.absolute()) and prov["export"]["created_utc"].endswith("Z")
    assert {"wsi_cmaf", "torch", "openslide_python", "tiffslide", "zarr"} <= set(prov["export"]["software"])
    assert "SYNTHETIC" in text["Disclaimer"] and text["Creation Time"] == prov["export"]["created_utc"]


def test_fast_png_writer_round_trips():
    rgb = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    data = encode_png(rgb, {"k": "value", "u": "µm ≥"}, dpi=150)
    import io

    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(np.asarray(im), rgb)
        assert im.text == {"k": "value", "u": "µm ≥"}
        assert im.info["dpi"] == pytest.approx((150, 150), abs=0.02)  # 5906 px/m, as PNG stores it


def test_missing_slide_draws_heatmap_alone(tmp_path, caplog):
    make_store(tmp_path / "s.zarr")
    with caplog.at_level(logging.WARNING):
        out = overlay(tmp_path / "s.zarr")  # recorded slide path does not exist
    assert out == tmp_path / "s_overlay.png" and out.stat().st_size > 10_000
    assert "drawing the heatmap alone" in caplog.text
    pic = render_overlay(HeatmapStore.open(tmp_path / "s.zarr"), tmp_path / "nope.svs")
    assert "heatmap only" in pic.note
    assert pic.extent == (ORIGIN[0], ORIGIN[0] + COLS * STRIDE, ORIGIN[1] + ROWS * STRIDE, ORIGIN[1])


def test_cli_overlay(tmp_path, capsys):
    make_store(tmp_path / "s.zarr")
    out = tmp_path / "cli.png"
    assert main(["export", "overlay", str(tmp_path / "s.zarr"), "--out", str(out), "--threshold", "0.9",
                 "--mode", "threshold"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["export", "overlay", str(tmp_path / "nothing.zarr")]) == 2  # usage: no such path
    assert main(["export", "overlay", str(tmp_path)]) == 1  # runtime: a folder that is not a store
    assert main(["export", "overlay", str(tmp_path / "s.zarr"), "--cmap", "no-such-map"]) == 1
    assert "no-such-map" in capsys.readouterr().err
    assert main(["export", "overlay", str(tmp_path / "s.zarr"), "--cmap", "viridis", "--out", str(out)]) == 0


@pytest.mark.parametrize("span, nice", [(2.3, 2.0), (0.07, 0.05), (7.0, 5.0), (10.0, 10.0), (0.0011, 0.001)])
def test_scale_bar_length(span, nice):
    assert _nice_length(span) == pytest.approx(nice)


def test_given_thumbnail_is_drawn_without_reading_the_slide(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    reader = FakeReader()
    picture = np.zeros((300, 420, 3), np.uint8)
    picture[:, :, 1] = 255
    pic = render_overlay(store, reader, thumbnail=picture)
    assert reader.calls == []
    np.testing.assert_array_equal(pixel(pic, SLIDE_W - 30, SLIDE_H / 2), (0, 255, 0))
    with pytest.raises(OutputError, match="RGB"):
        render_overlay(store, reader, thumbnail=picture[..., 0])


def test_background_from_tissue_thumbnail():
    assert background_from(np.zeros((300, 500, 3), np.uint8)) is None  # < half the 1,180 px map: read anew
    same = np.zeros((500, 750, 3), np.uint8)
    assert background_from(same) is same  # between half and full map size: upsampled when drawn
    big = np.random.default_rng(0).integers(0, 256, (2500, 3125, 3), dtype=np.uint8)
    small = background_from(big)
    assert small.shape == (1250, 1563, 3)  # reduced 2x, still at least 1,180 px wide
    np.testing.assert_allclose(small[:10, :10].astype(float),
                               big[:20, :20].reshape(10, 2, 10, 2, 3).mean(axis=(1, 3)), atol=0.51)


def test_overlay_is_fast(tmp_path):
    """The overlay is a fixed cost per slide (issue 12): ~0.1 s here; the old matplotlib one took ~1 s."""
    store = make_store(tmp_path / "s.zarr")
    background = np.full((800, 1070, 3), 200, np.uint8)
    overlay(store, FakeReader(), tmp_path / "warm.png", thumbnail=background)  # fonts, LUT
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        overlay(store, FakeReader(), tmp_path / "o.png", thumbnail=background)
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.5, times  # generous: shared 2-core CI machines
