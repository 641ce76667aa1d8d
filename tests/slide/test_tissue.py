"""Tissue detection: real slides, blank slides, ink, resolution independence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.color import rgb2hsv
from skimage.draw import disk as draw_disk
from skimage.draw import line as draw_line

from tests.helpers.slides import write_tiff_slide
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.slide import TissueConfig, detect_tissue, open_slide, tissue_mask_from_rgb

PINK = (225, 150, 190)
GREEN_INK = (40, 150, 90)


def _scene(size: int, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """White glass with one big pink 'tissue' disk and a tiny pink speck; sizes scale with 1/mpp."""
    img = np.full((size, size, 3), 245, dtype=np.int16)
    truth = np.zeros((size, size), bool)
    rr, cc = draw_disk((size * 0.5, size * 0.45), size * 0.3, shape=truth.shape)
    truth[rr, cc] = True
    img[truth] = PINK
    rr, cc = draw_disk((size * 0.1, size * 0.9), max(1.0, 2 * scale), shape=truth.shape)
    img[rr, cc] = PINK  # speck of about (2 px at 8 µm/px)^2 -> far below min_object_um2
    img += rng.integers(-6, 7, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), truth


@pytest.mark.parametrize("mpp", [8.0, 4.0])
def test_synthetic_scene_is_found_and_specks_dropped(mpp: float) -> None:
    scale = 8.0 / mpp  # same physical scene at two resolutions
    img, truth = _scene(int(200 * scale), scale, np.random.default_rng(0))
    tm = tissue_mask_from_rgb(img, mpp)
    iou = (tm.mask & truth).sum() / (tm.mask | truth).sum()
    assert iou > 0.95
    speck = np.zeros_like(truth)
    speck[: truth.shape[0] // 5, int(truth.shape[1] * 0.8):] = True
    assert not (tm.mask & speck).any()
    assert tm.mpp == mpp


@pytest.mark.parametrize("level", [255, 238])
def test_blank_and_near_white_give_empty_mask(level: int) -> None:
    rng = np.random.default_rng(1)
    img = np.clip(level + rng.integers(-8, 1, size=(300, 300, 3)), 0, 255).astype(np.uint8)
    tm = tissue_mask_from_rgb(img, 8.0)
    assert tm.fraction() == 0.0


def test_blank_slide_file_has_no_tissue(tmp_path: Path) -> None:
    blank = np.full((2048, 2048, 3), 250, dtype=np.uint8)
    path = write_tiff_slide(tmp_path / "blank.svs", blank, mpp=0.5, downsamples=(1, 4, 16))
    with open_slide(path) as r:
        tm = detect_tissue(r)
        assert tm.mask.shape == r.thumbnail(8.0).shape[:2] == (128, 128)
    assert tm.fraction() == 0.0


def test_green_ink_is_not_tissue() -> None:
    img, truth = _scene(200, 1.0, np.random.default_rng(2))
    ink = np.zeros_like(truth)
    for off in range(-2, 3):  # a 5-px-wide pen stroke, partly over glass, partly over tissue
        rr, cc = draw_line(20, 10 + off, 190, 150 + off)
        ink[rr, cc] = True
    img[ink] = GREEN_INK
    tm = tissue_mask_from_rgb(img, 8.0)
    assert not (tm.mask & ink).any()
    assert (tm.mask & truth & ~ink).sum() / (truth & ~ink).sum() > 0.95
    kept = tissue_mask_from_rgb(img, 8.0, TissueConfig(pen_hue_range=None, exclude_ink=False))
    assert (kept.mask & ink & ~truth).sum() > 100  # without the filters the ink counts as tissue


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        TissueConfig(mpp=0)
    with pytest.raises(ConfigError):
        TissueConfig(min_saturation=0.3, max_threshold=0.2)


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("key", "mpp", "low", "high"),
    [("svs", None, 0.25, 0.55), ("tiff", None, 0.25, 0.55),
     ("jp2k_svs", 0.5, 0.45, 0.8), ("dicom", 0.5, 0.25, 0.6)],
)
def test_real_slides_have_tissue(real_slide, key: str, mpp: float | None, low: float, high: float) -> None:
    # jp2k_svs and dicom carry no µm/px; 0.5 is an assumed override (only scales the thumbnail).
    with open_slide(real_slide(key), mpp=mpp) as r:
        tm = detect_tissue(r)
        thumb = r.thumbnail(tm.mpp)
    assert low < tm.fraction() < high
    hsv = rgb2hsv(thumb)
    # Pixels called tissue are far more saturated than those called background (marker ink is neither).
    background = ~tm.mask & ~tm.ink & (hsv[..., 2] > 0.12)
    assert hsv[..., 1][tm.mask].mean() > 3 * hsv[..., 1][background].mean()
    if key == "dicom":
        green = (hsv[..., 0] > 0.2) & (hsv[..., 0] < 0.55) & (hsv[..., 1] > 0.2)
        assert green.sum() > 500  # the slide has green ink ...
        assert not (tm.mask & green).any()  # ... and none of it is called tissue


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_closing_in_row_chunks_equals_skimage(radius: int) -> None:
    """The parallel closing (scipy, dask row chunks with a 2 * radius halo) is skimage's closing,
    image borders included."""
    from skimage.morphology import closing, disk

    from wsi_cmaf.slide.tissue import _closing, _closing_in_rows

    rng = np.random.default_rng(radius)
    mask = rng.random((301, 157)) > 0.7
    mask[:4] |= rng.random((4, 157)) > 0.4  # structure on the image border
    footprint = disk(radius)
    ref = closing(mask, footprint)
    np.testing.assert_array_equal(_closing(mask, footprint), ref)
    chunked = _closing_in_rows(mask, footprint, 37)
    np.testing.assert_array_equal(chunked, ref)


def test_tissue_mask_same_in_one_piece_and_in_chunks(monkeypatch) -> None:
    import dask

    import wsi_cmaf.slide.tissue as tissue_mod

    img, _ = _scene(700, 1.0, np.random.default_rng(3))
    img[350:352] = GREEN_INK  # an ink line across chunk borders
    monkeypatch.setattr(tissue_mod, "_PARALLEL_MIN_PIXELS", 10**12)
    whole = tissue_mask_from_rgb(img, 8.0)
    monkeypatch.setattr(tissue_mod, "_PARALLEL_MIN_PIXELS", 0)
    with dask.config.set(num_workers=5):
        assert tissue_mod._row_chunks(700, 700 * 700) == 140
        chunked = tissue_mask_from_rgb(img, 8.0)
    assert whole.threshold == chunked.threshold
    np.testing.assert_array_equal(whole.mask, chunked.mask)
