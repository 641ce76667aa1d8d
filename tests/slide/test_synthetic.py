"""Synthetic slides: Aperio layout both backends agree on, determinism, streaming, ground truth."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest
import tifffile

from wsi_cmaf.cli import main as cli_main
from wsi_cmaf.slide import _synthetic_render as render
from wsi_cmaf.slide import detect_tissue, open_slide
from wsi_cmaf.slide.synthetic import auto_downsamples, load_tumour_mask, write_synthetic_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "slide.tiff"
    return write_synthetic_slide(out, 4096, 3072, mpp=0.25, seed=11, tile=256)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_backends_see_aperio_with_same_mpp(slide, backend):
    with open_slide(slide.path, backend=backend) as r:
        assert r.backend == backend
        assert r.vendor == "aperio"
        assert r.mpp == pytest.approx((0.25, 0.25))
        assert r.mpp_source == "vendor"
        assert r.objective_power == pytest.approx(40.0)
        assert r.level_dimensions == ((4096, 3072), (1024, 768))
        assert r.level_downsamples == pytest.approx((1.0, 4.0))
        assert "thumbnail" in r.associated_images
        assert r.associated_images["thumbnail"].shape[2] == 3


def test_tiff_layout_and_resolution_tags(slide):
    with tifffile.TiffFile(slide.path) as tf:
        pages = tf.pages
        assert len(pages) == 3  # level 0, thumbnail, level 1
        assert pages[0].is_tiled and not pages[1].is_tiled and pages[2].is_tiled
        assert pages[0].description.startswith("Aperio Image Library")
        assert "MPP = 0.25" in pages[0].description
        for page, ds in ((pages[0], 1), (pages[2], 4)):
            assert page.subfiletype == 0
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert int(page.tags["ResolutionUnit"].value) == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert 1e4 / (num / den) == pytest.approx(0.25 * ds, rel=1e-6)


def test_same_seed_same_file_other_seed_differs(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.tiff", 1024, 768, seed=5, tile=256, save_mask=False)
    b = write_synthetic_slide(tmp_path / "b.tiff", 1024, 768, seed=5, tile=256, save_mask=False)
    c = write_synthetic_slide(tmp_path / "c.tiff", 1024, 768, seed=6, tile=256, save_mask=False)
    digest = [hashlib.sha256(s.path.read_bytes()).hexdigest() for s in (a, b, c)]
    assert digest[0] == digest[1]
    assert digest[0] != digest[2]
    np.testing.assert_array_equal(a.tumour_mask, b.tumour_mask)


def test_tiles_do_not_depend_on_render_order(slide):
    """A tile rendered alone equals the same pixels inside a bigger window (no per-tile seams)."""
    fields = render.make_fields(slide.width, slide.height, slide.seed, True, False)
    noise = np.zeros((512, 512), np.float32)
    big = render.render_tile(fields, slide.seed, slide.mpp, 1, 1024, 1024, 512, noise)
    small = render.render_tile(fields, slide.seed, slide.mpp, 1, 1024 + 256, 1024 + 128, 256, noise[:256, :256])
    assert big is not None and small is not None
    np.testing.assert_array_equal(big[256:, 128:384], small)


def test_reduced_level_matches_downsampled_level0(slide):
    with open_slide(slide.path, backend="tiffslide") as r:
        x, y, n = 1024, 1024, 2048  # tissue-rich centre; compare at level-1 resolution
        l0 = r.read_region((x, y), 0, (n, n)).astype(np.float32)
        l1 = r.read_region((x, y), 1, (n // 4, n // 4)).astype(np.float32)
    down = l0.reshape(n // 4, 4, n // 4, 4, 3).mean(axis=(1, 3))
    assert np.abs(down - 255).mean() > 10  # the window really holds tissue
    assert np.abs(down - l1).mean() < 6.0


def test_tumour_mask_saved_and_darker_than_benign_tissue(slide):
    mask, mask_mpp = load_tumour_mask(slide.path)
    np.testing.assert_array_equal(mask, slide.tumour_mask)
    assert mask_mpp == slide.mask_mpp == 4.0
    assert mask.shape == (np.ceil(3072 * 0.25 / 4), np.ceil(4096 * 0.25 / 4))
    assert 0.001 < mask.mean() < 0.5
    with open_slide(slide.path) as r:
        thumb = r.thumbnail(4.0).astype(np.float32).mean(axis=2)
        tissue = detect_tissue(r)
    h, w = min(thumb.shape[0], mask.shape[0]), min(thumb.shape[1], mask.shape[1])
    thumb, tum = thumb[:h, :w], mask[:h, :w]
    tissue_px = thumb < 225
    assert thumb[tum].mean() < thumb[tissue_px & ~tum].mean() - 15
    # Ground-truth tumour lies inside the detected tissue (up to edge pixels).
    from skimage.transform import resize

    tissue4 = resize(tissue.mask.astype(float), (h, w), order=0) > 0.5
    assert (tum & tissue4).sum() >= 0.9 * tum.sum()


def test_no_tumour_and_blank(tmp_path):
    benign = write_synthetic_slide(tmp_path / "benign.tiff", 2048, 1536, seed=2, tumour=False, tile=256)
    assert not benign.tumour_mask.any()
    blank = write_synthetic_slide(tmp_path / "blank.tiff", 2048, 1536, seed=2, blank=True, tile=256)
    assert not blank.tumour_mask.any()
    with open_slide(blank.path) as r:
        thumb = r.thumbnail(8.0)
        assert thumb.min() > 220  # background only
        assert not detect_tissue(r).mask.any()
    with open_slide(benign.path) as r:
        assert detect_tissue(r).fraction() > 0.05


def test_memory_does_not_grow_with_size(tmp_path):
    """Peak traced memory of a 6000x4500 slide (81 MB raw level 0) stays near that of a small one."""
    peaks = []
    for name, (w, h) in {"small": (1024, 1024), "large": (6000, 4500)}.items():
        render.level0_textures.cache_clear()
        render.bank_for.cache_clear()
        tracemalloc.start()
        write_synthetic_slide(tmp_path / f"{name}.tiff", w, h, seed=1, tile=256, save_mask=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 20 * 2**20, peaks


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        write_synthetic_slide(tmp_path / "x.tiff", 1024, 1024, tile=100)
    with pytest.raises(ValueError, match="powers of two"):
        write_synthetic_slide(tmp_path / "x.tiff", 1024, 1024, downsamples=(1, 3))
    assert auto_downsamples(100_000, 80_000) == (1, 4, 16, 64, 256)
    assert auto_downsamples(4000, 4000) == (1, 4)


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli.tiff"
    assert cli_main(["synth", str(out), "--width", "1024", "--height", "768", "--seed", "4"]) == 0
    assert out.is_file() and (tmp_path / "cli_tumour_mask.png").is_file()
    assert "tumour mask" in capsys.readouterr().out
    assert cli_main(["synth", str(out), "--tile", "100"]) == 2
