"""µm/px estimated from nuclear sizes: synthetic nuclei of known size, the real CMU slide and its
copies resampled by 2 and 4 with the metadata removed, ``open_slide(mpp="estimate")`` and the
disagreement warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.draw import disk

from wsi_cmaf.errors import MissingResolutionError, MppEstimateError
from wsi_cmaf.qc.mpp_estimate import (
    DISAGREE_FACTOR,
    ESTIMATED_SOURCE,
    REFERENCE_DIAMETER_UM,
    MppEstimate,
    estimate_from_tiles,
    estimate_mpp,
    mpp_disagreement,
)
from wsi_cmaf.slide import open_slide

PINK, PURPLE = (232, 168, 200), (80, 48, 140)


def _nuclei_tiles(diameter: int, n_tiles: int = 6, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Pink tiles with purple discs of ``diameter`` px on a jittered lattice (none touch)."""
    rng = np.random.default_rng(seed)
    tiles = []
    pitch = 2 * diameter
    for _ in range(n_tiles):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = PINK
        for cy in range(pitch // 2, size - pitch // 2, pitch):
            for cx in range(pitch // 2, size - pitch // 2, pitch):
                jy, jx = rng.integers(-diameter // 4, diameter // 4 + 1, 2)
                rr, cc = disk((cy + jy, cx + jx), diameter / 2, shape=img.shape[:2])
                img[rr, cc] = PURPLE
        tiles.append(img)
    return tiles


@pytest.mark.parametrize("diameter", [8, 12, 24])
def test_estimate_from_discs_of_known_size(diameter: int) -> None:
    est = estimate_from_tiles(_nuclei_tiles(diameter))
    # a digitised disc of diameter d px has about pi d^2 / 4 px, so its equivalent diameter is ~d
    assert est.diameter_px == pytest.approx(diameter, rel=0.06)
    assert est.mpp == pytest.approx(REFERENCE_DIAMETER_UM / diameter, rel=0.06)
    assert est.interval[0] < est.mpp < est.interval[1]
    assert est.n_nuclei >= 50


def test_estimate_scales_with_the_pixels() -> None:
    small, large = estimate_from_tiles(_nuclei_tiles(10)), estimate_from_tiles(_nuclei_tiles(20))
    assert small.mpp / large.mpp == pytest.approx(2.0, rel=0.06)


def test_too_few_nuclei_is_a_named_error() -> None:
    blank = [np.full((256, 256, 3), PINK, np.uint8) for _ in range(4)]
    with pytest.raises(MppEstimateError, match="nucleus-like objects"):
        estimate_from_tiles(blank)


def test_disagreement_warning_threshold() -> None:
    est = MppEstimate(mpp=0.5, interval=(0.4, 0.6), diameter_px=10.6, n_nuclei=500, n_tiles=10)
    assert mpp_disagreement((0.5, 0.5), est) is None
    assert mpp_disagreement((0.5 * DISAGREE_FACTOR * 0.99,) * 2, est) is None
    message = mpp_disagreement((0.25, 0.25), est)  # a 40x label on a 20x scan
    assert message is not None and "2.00x" in message and "--mpp-check off" in message


def _copy_without_metadata(src: Path, factor: int, out: Path) -> float:
    with open_slide(src) as r:
        w, h = r.level_dimensions[0]
        rgb, mpp = r.read_region((0, 0), 0, (w, h)), r.mpp[0]
    small = np.asarray(Image.fromarray(rgb).reduce(factor)) if factor > 1 else rgb
    tifffile.imwrite(out, small, tile=(256, 256), photometric="rgb", compression="zlib")
    return mpp * w / small.shape[1]


@pytest.mark.realdata
@pytest.mark.parametrize("key", ["svs", "tiff"])
def test_real_cmu_estimate_within_floor(real_slide, key: str) -> None:
    with open_slide(real_slide(key)) as r:
        truth = r.mpp[0]
        est = estimate_mpp(r)
    assert abs(est.mpp / truth - 1) <= 0.25
    assert est.interval[0] <= truth <= est.interval[1]
    assert est.confident


@pytest.mark.realdata
@pytest.mark.parametrize("factor", [2, 4])
def test_resampled_copy_without_metadata(real_slide, tmp_path: Path, factor: int) -> None:
    path = tmp_path / f"cmu_x{factor}.tiff"
    truth = _copy_without_metadata(real_slide("svs"), factor, path)
    with open_slide(path) as r:
        assert not r.has_mpp  # the copy really has no µm/px
        with pytest.raises(MissingResolutionError):
            _ = r.mpp
    with open_slide(path, mpp="estimate") as r:
        assert r.mpp_source == ESTIMATED_SOURCE
        assert r.mpp_estimate is not None
        assert r.mpp[0] == r.mpp[1] == r.mpp_estimate.mpp
        assert abs(r.mpp[0] / truth - 1) <= 0.25
        thumb = r.thumbnail(8.0)  # anything that needs µm/px now works
    assert thumb.shape[1] == pytest.approx(r.level_dimensions[0][0] * r.mpp[0] / 8.0, abs=1)
