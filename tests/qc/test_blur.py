"""Out-of-focus tiles: one quadrant of the real CMU pixels blurred with a Gaussian of σ = 2 and 3 px
is flagged (≥ 80 % of its tissue tiles), the in-focus tissue is not (≤ 5 %)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from wsi_cmaf.qc.blur import FOCUS_SPACING_UM, band_ratio, blurred_tiles, tile_sharpness
from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide


def _blurred_copy(src: Path, out: Path, sigma: float) -> tuple[np.ndarray, float]:
    with open_slide(src) as r:
        w, h = r.level_dimensions[0]
        rgb, mpp = r.read_region((0, 0), 0, (w, h)), r.mpp[0]
    quad = rgb[h // 2:, w // 2:].astype(np.float32)
    rgb = rgb.copy()
    rgb[h // 2:, w // 2:] = np.clip(ndi.gaussian_filter(quad, (sigma, sigma, 0)) + 0.5, 0, 255).astype(np.uint8)
    tifffile.imwrite(out, rgb, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return rgb, mpp


@pytest.mark.realdata
@pytest.mark.parametrize("spacing_um", [None, FOCUS_SPACING_UM])
@pytest.mark.parametrize("sigma", [2.0, 3.0])
def test_blurred_quadrant_is_flagged(real_slide, tmp_path: Path, sigma: float, spacing_um: float | None) -> None:
    """Every tile measured (None), or the lattice the analysis measures, grown around what it finds."""
    path = tmp_path / "cmu_blur.tiff"
    _blurred_copy(real_slide("svs"), path, sigma)
    with open_slide(path) as r:
        w0, h0 = r.level_dimensions[0]
        grid = TileGrid.from_slide(r, GridConfig(mpp=1.0, tile_size=64), detect_tissue(r))
        sharp = tile_sharpness(r, grid, spacing_um=spacing_um)
        mx = r.mpp[0]
    flagged = blurred_tiles(sharp)
    rows, cols = np.indices(grid.shape)
    tile_l0 = 64 * 1.0 / mx
    x0, y0 = cols * tile_l0, rows * tile_l0
    inside = (x0 >= w0 // 2) & (y0 >= h0 // 2)  # wholly in the blurred quadrant
    outside = (x0 + tile_l0 <= w0 // 2) | (y0 + tile_l0 <= h0 // 2)  # wholly in focus
    judged = grid.tissue & np.isfinite(sharp)
    assert not flagged[~grid.tissue].any()  # only tissue tiles are measured
    if spacing_um is None:
        assert (judged & inside).sum() >= 40 and (judged & outside).sum() >= 80
        assert flagged[judged & inside].mean() >= 0.80
        assert flagged[judged & outside].mean() <= 0.05
        return
    # the lattice (every 6th tile of 64 µm each way) found the quadrant and the growth delineated it:
    # the share is of all its tissue tiles, measured or not
    assert (grid.tissue & inside).sum() >= 40
    assert flagged[grid.tissue & inside].mean() >= 0.80
    assert flagged[grid.tissue & outside].mean() <= 0.05
    # while most of the in-focus tissue was never decoded
    assert judged[grid.tissue & outside].mean() <= 0.4


def test_lattice_grows_only_around_blur(monkeypatch) -> None:
    """Lattice and growth on a hand-made grid: which tiles get measured, by hand."""
    from wsi_cmaf.qc import blur

    class Grid:  # the two attributes tile_sharpness reads besides the window geometry
        shape = (9, 9)
        tissue = np.ones((9, 9), bool)
        config = type("C", (), {"tile_size": 100, "mpp": 1.0})()  # 100 µm tiles

    truth = np.full((9, 9), 2.0, np.float32)
    truth[0:3, 0:3] = 0.1  # a blurred 3x3 corner that holds the lattice tile (1, 1)
    calls: list[tuple[int, int]] = []

    def measure(rc: tuple[int, int]) -> float:
        calls.append(rc)
        return float(truth[rc])

    monkeypatch.setattr(blur, "_window_measure", lambda reader, grid: measure)
    out = blur.tile_sharpness(None, Grid(), spacing_um=300)  # stride 3: lattice rows/cols 1, 4, 7
    lattice = {(r, c) for r in (1, 4, 7) for c in (1, 4, 7)}
    # the corner's 9 tiles grow one ring: rows/cols 0-3 are measured, and nothing else off the lattice
    grown = {(r, c) for r in range(4) for c in range(4)}
    assert set(calls) == lattice | grown and len(calls) == len(lattice | grown)
    assert np.array_equal(blurred_tiles(out), truth < 0.45)
    assert np.isnan(out[8, 8]) and np.isnan(out[5, 6])  # off the lattice, near no blur: not judged


def test_haematoxylin_matches_rgb2hed() -> None:
    from skimage.color import rgb2hed

    from wsi_cmaf.qc.blur import haematoxylin

    rgb = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    rgb[0, 0] = 0  # the 1e-6 floor
    np.testing.assert_allclose(haematoxylin(rgb), rgb2hed(rgb)[..., 0], rtol=0, atol=2e-6)


def test_band_ratio_drops_with_blur() -> None:
    rng = np.random.default_rng(0)
    # purple specks of 1-3 px on pink: detail at the finest scale, like nuclei texture
    img = np.empty((128, 128, 3), np.float32)
    img[:] = (230, 170, 200)
    dots = rng.random((128, 128)) > 0.85
    img[dots] = (90, 50, 150)
    sharp = np.clip(img, 0, 255).astype(np.uint8)
    soft = np.clip(ndi.gaussian_filter(img, (2, 2, 0)) + 0.5, 0, 255).astype(np.uint8)
    assert band_ratio(sharp) > 1.0 > 0.45 > band_ratio(soft)
    assert np.isnan(band_ratio(np.full((128, 128, 3), 250, np.uint8)))  # glass is not judged
