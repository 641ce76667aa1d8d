"""Slide reader: backends, µm/px chain, level choice, regions, thumbnails, real scanner files."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers.slides import make_image, write_tiff_slide
from wsi_cmaf.errors import ConfigError, MissingResolutionError, UnreadableSlideError
from wsi_cmaf.slide import SlideReader, open_slide


@pytest.fixture()
def synthetic(tmp_path: Path) -> tuple[Path, np.ndarray]:
    img = make_image(1000, 760)
    return write_tiff_slide(tmp_path / "syn.svs", img, mpp=0.25, downsamples=(1, 4, 16)), img


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_read_region_exact_on_lossless_tiff(synthetic, backend: str) -> None:
    path, img = synthetic
    with open_slide(path, backend=backend) as r:
        assert r.backend == backend
        assert r.level_count == 3
        assert r.level_dimensions[0] == (1000, 760)
        assert r.level_dimensions[1] == (250, 190)
        out = r.read_region((123, 45), 0, (300, 200))
        assert out.dtype == np.uint8 and out.shape == (200, 300, 3)
        np.testing.assert_array_equal(out, img[45:245, 123:423])
        lvl1 = r.read_region((400, 80), 1, (50, 40))  # level-0 location, level-1 pixels
        np.testing.assert_array_equal(lvl1, img[::4, ::4][20:60, 100:150])


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_out_of_bounds_is_white(synthetic, backend: str) -> None:
    path, img = synthetic
    with open_slide(path, backend=backend) as r:
        out = r.read_region((900, 700), 0, (200, 100))
    np.testing.assert_array_equal(out[:60, :100], img[700:760, 900:1000])
    assert (out[60:] == 255).all() and (out[:, 100:] == 255).all()


def test_auto_prefers_openslide_and_both_agree(synthetic) -> None:
    path, _ = synthetic
    with open_slide(path) as a, open_slide(path, backend="tiffslide") as b:
        assert a.backend == "openslide"
        assert a.mpp == b.mpp == (0.25, 0.25)
        assert a.mpp_source == b.mpp_source == "vendor"
        assert a.vendor == "aperio"


def test_openslide_fast_path_matches_public_api(real_slide) -> None:
    with open_slide(real_slide("svs"), backend="openslide") as r:
        impl = r._impl
        for loc, size in [((100, 200), (512, 300)), ((2000, 2800), (400, 300)), ((-50, -20), (120, 90))]:
            fast = r.read_region(loc, 0, size)
            ref = impl.read_region_public(loc, 0, size)
            np.testing.assert_array_equal(fast, ref)
        assert (r.read_region((2100, 2900), 0, (300, 200))[150:, 200:] == 255).all()


# --- µm/px chain ---------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["CENTIMETER", "INCH"])
def test_mpp_from_tiff_resolution(tmp_path: Path, unit: str) -> None:
    path = write_tiff_slide(tmp_path / "gen.tif", make_image(600, 500), mpp=0.5, aperio=False,
                            resolution_unit=unit)
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as r:
            assert r.mpp_source == "tiff-resolution"
            assert r.mpp == pytest.approx((0.5, 0.5), rel=1e-6)
            assert r.level_mpp(1) == pytest.approx((2.0, 2.0), rel=1e-6)


def test_mpp_from_objective_power_warns(tmp_path: Path, caplog) -> None:
    path = write_tiff_slide(tmp_path / "mag.svs", make_image(512, 512), mpp=None, app_mag=40)
    with caplog.at_level(logging.WARNING):
        r = open_slide(path)
    assert r.mpp_source == "objective-power"
    assert r.mpp == pytest.approx((0.25, 0.25))
    assert any("objective power" in rec.getMessage() for rec in caplog.records)


def test_override_wins_and_missing_raises(tmp_path: Path, synthetic) -> None:
    path, _ = synthetic
    with open_slide(path, mpp=0.3) as r:
        assert r.mpp == (0.3, 0.3) and r.mpp_source == "override"
    with open_slide(path, mpp=(0.3, 0.35)) as r:
        assert r.mpp == (0.3, 0.35)
    bare = write_tiff_slide(tmp_path / "bare.tif", make_image(300, 300), mpp=None, aperio=False)
    r = open_slide(bare)  # opening works (info must be able to describe it) ...
    assert not r.has_mpp and r.mpp_source is None
    with pytest.raises(MissingResolutionError) as exc:
        r.mpp  # noqa: B018  (... but asking for µm/px raises the named error)
    assert str(bare) in str(exc.value) and "mpp=" in str(exc.value)
    with pytest.raises(MissingResolutionError):
        r.thumbnail(8.0)
    r.close()
    for bad in (0, -1.0, float("nan"), (0.2,), "x"):
        with pytest.raises(ConfigError):
            open_slide(path, mpp=bad)


def test_level_for_mpp(synthetic) -> None:
    path, _ = synthetic  # levels at 0.25, 1.0, 4.0 µm/px
    with open_slide(path) as r:
        assert r.level_for_mpp(4.0) == 2
        assert r.level_for_mpp(8.0) == 2
        assert r.level_for_mpp(3.9) == 2  # within the 5 % tolerance
        assert r.level_for_mpp(3.7) == 1  # 3.97 > 3.7 * 1.05: must not pick the coarser level
        assert r.level_for_mpp(3.9, tolerance=0.0) == 1
        assert r.level_for_mpp(0.96) == 1  # 1.0 <= 0.96 * 1.05
        assert r.level_for_mpp(0.9) == 0
        assert r.level_for_mpp(0.1) == 0
        with pytest.raises(ValueError):
            r.level_for_mpp(0)


def test_thumbnail_on_target_grid(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:760, 0:1000]
    smooth = np.stack([128 + 100 * np.sin(xx / 60), 128 + 100 * np.cos(yy / 45),
                       np.full(xx.shape, 200.0)], axis=-1).astype(np.uint8)
    path = write_tiff_slide(tmp_path / "smooth.svs", smooth, mpp=0.25, downsamples=(1, 4, 16))
    with open_slide(path) as r:
        th = r.thumbnail(2.0)  # level 1 (1 µm/px) box-reduced by 2
        assert th.shape == (95, 125, 3)
        expected = smooth.reshape(95, 8, 125, 8, 3).mean(axis=(1, 3))
        assert np.abs(th.astype(float) - expected).max() < 6
        assert r.thumbnail(4.0).shape == (48, 63, 3)  # round-half-up of 62.5 x 47.5
        assert r.thumbnail(3.0).shape == (63, 83, 3)  # non-integer factor: Lanczos to the grid
        np.testing.assert_array_equal(r.thumbnail(1.0), smooth[::4, ::4])  # exactly level 1


def test_thumbnail_is_antialiased(tmp_path: Path) -> None:
    # 1-px checkerboard on a single-level slide: decimation would give pure 0 or 255,
    # an antialiased thumbnail is uniform mid-grey.
    yy, xx = np.mgrid[0:512, 0:512]
    board = np.repeat((((xx + yy) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    path = write_tiff_slide(tmp_path / "board.svs", board, mpp=0.5, downsamples=(1,))
    with open_slide(path) as r:
        th = r.thumbnail(8.0)
    assert th.shape == (32, 32, 3)
    assert np.abs(th.astype(int) - 127.5).max() <= 2


def test_associated_images_and_fingerprint(real_slide, tmp_path: Path) -> None:
    src = real_slide("svs")
    with open_slide(src) as r:
        assert set(r.associated_images) == {"label", "macro", "thumbnail"}
        label = r.associated_images["label"]
        assert label.dtype == np.uint8 and label.ndim == 3 and label.shape[2] == 3
        assert label.shape[:2] == (463, 387)
        fp = r.fingerprint()
    copy = tmp_path / "copy.svs"
    shutil.copy(src, copy)
    copy.chmod(0o644)
    with open_slide(copy) as r:
        assert r.fingerprint() == fp
    with open(copy, "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    with open_slide(copy) as r:
        assert r.fingerprint() != fp


def test_closed_reader_refuses(synthetic) -> None:
    path, _ = synthetic
    with open_slide(path) as r:
        assert isinstance(r, SlideReader)
    with pytest.raises(ValueError, match="closed"):
        r.read_region((0, 0), 0, (10, 10))


def test_bad_arguments(synthetic) -> None:
    path, _ = synthetic
    with pytest.raises(ConfigError):
        open_slide(path, backend="bioformats")
    with open_slide(path) as r:
        with pytest.raises(ValueError):
            r.read_region((0, 0), 5, (10, 10))
        with pytest.raises(ValueError):
            r.read_region((0, 0), 0, (0, 10))


def _strips_of(backend, level: int, rows: int) -> list[np.ndarray]:
    return list(backend.level_rows(level, rows))


@pytest.mark.parametrize("rows", [1, 37, 256, 300, 10_000])
def test_level_rows_tifffile_path_matches_reference(synthetic, rows: int) -> None:
    """tiffslide's whole-level strips (decoded by tifffile, several tiles at once) are the level's
    exact pixels in strips of exactly ``rows`` rows, whatever ``rows`` is relative to the tiles."""
    from wsi_cmaf.slide._backends import Backend

    path, img = synthetic
    with open_slide(path, backend="tiffslide") as r:
        impl = r._impl
        for level, ds in enumerate((1, 4, 16)):
            assert impl._level_page(level) is not None  # the fast path is the one under test
            strips = _strips_of(impl, level, rows)
            lh = r.level_dimensions[level][1]
            assert [len(s) for s in strips] == [min(rows, lh - y) for y in range(0, lh, rows)]
            got = np.concatenate(strips)
            np.testing.assert_array_equal(got, img[::ds, ::ds])
            np.testing.assert_array_equal(got, np.concatenate(list(Backend.level_rows(impl, level, rows))))


def test_level_rows_falls_back_for_other_layouts(tmp_path: Path) -> None:
    """A stripped (untiled) level is not streamed by tile rows; the read_region path serves it."""
    img = make_image(300, 200)
    path = tmp_path / "stripped.tiff"
    tifffile.imwrite(path, img, photometric="rgb", resolution=(40_000.0, 40_000.0), resolutionunit="CENTIMETER")
    with open_slide(path, backend="tiffslide") as r:
        assert r._impl._level_page(0) is None
        np.testing.assert_array_equal(np.concatenate(_strips_of(r._impl, 0, 64)), img)
        assert r.thumbnail(r.mpp[0]).shape == img.shape


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_thumbnail_same_for_any_strip_size(synthetic, backend: str, monkeypatch) -> None:
    import wsi_cmaf.slide.reader as reader_mod

    path, _ = synthetic
    with open_slide(path, backend=backend) as r:
        whole = r.thumbnail(2.0)
        monkeypatch.setattr(reader_mod, "_THUMB_STRIP_BYTES", 3 * 250 * 4)  # 3 rows of level 1
        np.testing.assert_array_equal(r.thumbnail(2.0), whole)


# --- real scanner files ------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("key", ["svs", "tiff"])
def test_real_openslide_and_tiffslide_agree(real_slide, key: str) -> None:
    path = real_slide(key)
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tiffslide") as b:
        assert a.mpp == pytest.approx(b.mpp, rel=1e-6)
        assert a.mpp == pytest.approx((0.499, 0.499), rel=1e-3)
        assert a.mpp_source == b.mpp_source == ("vendor" if key == "svs" else "tiff-resolution")
        assert a.level_dimensions == b.level_dimensions
        ra = a.read_region((500, 700), 0, (256, 256)).astype(int)
        rb = b.read_region((500, 700), 0, (256, 256)).astype(int)
        assert np.abs(ra - rb).mean() < 2.0  # same JPEG data, decoders may round differently


@pytest.mark.realdata
@pytest.mark.parametrize("key", ["svs", "tiff", "jp2k_svs"])
def test_real_level_rows_match_tiffslide_reads(real_slide, key: str) -> None:
    """On scanner files (JPEG, JPEG 2000, generic TIFF) the tifffile strips equal tiffslide's reads."""
    from wsi_cmaf.slide._backends import Backend

    with open_slide(real_slide(key), backend="tiffslide", mpp=0.5) as r:
        for level in range(r.level_count):
            assert r._impl._level_page(level) is not None
            fast = np.concatenate(_strips_of(r._impl, level, 10_000))
            ref = np.concatenate(list(Backend.level_rows(r._impl, level, 10_000)))
            np.testing.assert_array_equal(fast, ref)


@pytest.mark.realdata
def test_real_jp2k_svs_has_no_mpp(real_slide) -> None:
    path = real_slide("jp2k_svs")
    with open_slide(path) as r:
        assert r.level_count == 2 and r.vendor == "aperio"
        assert not r.has_mpp
        region = r.read_region((1500, 1500), 0, (256, 256))
        assert region.std() > 5  # real tissue decoded from JPEG 2000, not blank
    with open_slide(path, mpp=0.5) as r:
        assert r.mpp_source == "override"


@pytest.mark.realdata
def test_real_dicom_single_file(real_slide, tmp_path: Path) -> None:
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = real_slide("dicom")
    with open_slide(path, mpp=0.5) as r:
        assert r.backend == "pydicom"  # OpenSlide, tiffslide and wsidicom refuse this file
        assert r.level_dimensions == ((3236, 2638),)
        ours = r.read_region((0, 0), 0, (3236, 2638))
        corner = r.read_region((3200, 2600), 0, (100, 100))
    assert (corner[38:] == 255).all() and (corner[:, 36:] == 255).all()
    # The first tile is mostly glass: after a correct YCbCr decode it is near-white, not salmon.
    glass = ours[:500, 1500:2000]
    assert np.median(glass.reshape(-1, 3), axis=0).min() > 200

    # A standard-conformant copy (ImageType VOLUME, pixel spacing, YBR) opens with wsidicom
    # and must decode to exactly the same pixels.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # over-long UIDs in this file
        ds = pydicom.dcmread(path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    measures = Dataset()
    measures.PixelSpacing = [0.0005, 0.00025]  # row (y), column (x) spacing in mm
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    conformant = tmp_path / "conformant.dcm"
    ds.save_as(conformant)
    with open_slide(conformant, backend="wsidicom") as w:
        assert w.mpp == pytest.approx((0.25, 0.5)) and w.mpp_source == "vendor"
        np.testing.assert_array_equal(w.read_region((0, 0), 0, (3236, 2638)), ours)
    with open_slide(conformant, backend="pydicom") as p:
        assert p.mpp == pytest.approx((0.25, 0.5))
    with pytest.raises(UnreadableSlideError, match="tiffslide"):
        open_slide(path, backend="tiffslide")
