"""Batched on-device preprocessing, batching and the per-slide stain fit of the inference loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.models import DarknessClassifier
from wsi_cmaf.infer.runner import BatchRunner
from wsi_cmaf.infer.stainfit import fit_slide_stain
from wsi_cmaf.preprocess import TilePreprocessor, resize_matrix
from wsi_cmaf.slide import TissueConfig, detect_tissue, open_slide
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reads import read_block
from wsi_cmaf.slide.synthetic import write_synthetic_slide
from wsi_cmaf.stain import MacenkoNormalizer, fit_macenko
from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, patient_params, render_patches

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _he_fit(seed: int):
    """A Macenko fit of H&E-like patches rendered with a patient's own stain vectors."""
    rng = np.random.default_rng(seed)
    patches = render_patches(np.array([0, 1] * 8), SyntheticPatchConfig(), rng, patient_params(rng, 1.0))
    return fit_macenko(patches)


@pytest.mark.parametrize(("n_in", "n_out", "mode"), [
    (50, 224, "bicubic"), (50, 64, "bicubic"), (96, 64, "bicubic"), (50, 64, "bilinear"),
    (100, 64, "bilinear"), (50, 64, "nearest"), (50, 50, "bicubic"),
])
def test_resize_matrix_reproduces_interpolate(n_in, n_out, mode):
    x = torch.rand(3, 3, n_in, n_in, dtype=torch.float64) * 255
    smooth = mode in {"bilinear", "bicubic"}
    kw = {"align_corners": False, "antialias": n_out < n_in} if smooth else {}
    want = F.interpolate(x, size=(n_out, n_out), mode=mode, **kw)
    a = resize_matrix(n_in, n_out, mode).double()
    # float32 weights on a 0-255 scale; a wrong kernel or border rule is off by > 0.1
    torch.testing.assert_close(a @ x @ a.T, want, rtol=0, atol=1e-4)


def test_preprocessor_equals_stain_interpolate_clamp_normalise():
    tiles = torch.randint(0, 256, (5, 50, 50, 3), dtype=torch.uint8)
    stain = MacenkoNormalizer().set_source(_he_fit(0))
    got = TilePreprocessor(64, MEAN, STD, "bicubic", stain)(tiles)
    x = stain(tiles.permute(0, 3, 1, 2).float())
    x = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 255)
    want = (x - torch.tensor(MEAN).view(1, 3, 1, 1) * 255) / (torch.tensor(STD).view(1, 3, 1, 1) * 255)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_fused_stain_map_equals_deconvolve_then_recolour():
    norm = MacenkoNormalizer().set_source(_he_fit(1))
    x = torch.randint(0, 256, (2, 3, 9, 9)).float()
    od = -torch.log((x + 1) / norm.io)
    conc = torch.einsum("kc,bchw->bkhw", norm.src_pinv, od) * norm.src_scale.view(1, 2, 1, 1)
    want = (norm.io * torch.exp(-torch.einsum("ck,bkhw->bchw", norm.ref_matrix, conc))).clamp(0, 255)
    torch.testing.assert_close(norm(x), want, rtol=0, atol=2e-3)


@pytest.mark.parametrize(("n", "sizes"), [(300, [150, 150]), (256, [256]), (257, [128, 129]),
                                          (1, [1]), (600, [200, 200, 200])])
def test_batches_are_equal_and_bounded(n, sizes):
    seen = []

    class Spy(DarknessClassifier):
        def forward(self, x):
            seen.append(len(x))
            return super().forward(x)

    runner = BatchRunner(Spy(), TilePreprocessor(32, MEAN, STD), torch.device("cpu"), 256)
    tiles = np.random.default_rng(0).integers(0, 256, (n, 50, 50, 3), dtype=np.uint8)
    probs = runner(tiles)
    assert seen == sizes and probs.shape == (n, 2)
    one_by_one = np.concatenate([runner(tiles[i:i + 1]) for i in range(0, n, max(1, n // 7))])
    np.testing.assert_allclose(probs[::max(1, n // 7)], one_by_one, atol=1e-6)


@pytest.fixture(scope="module")
def slide_grid(tmp_path_factory):
    s = write_synthetic_slide(tmp_path_factory.mktemp("fit") / "f.tiff", 6400, 4800, 0.5, seed=8)
    reader = open_slide(s.path)
    grid = TileGrid.from_slide(reader, GridConfig(mpp=4.0, tile_size=50),
                               detect_tissue(reader, TissueConfig()))
    yield reader, grid
    reader.close()


def test_stain_fit_samples_tissue_tiles_at_tile_resolution(slide_grid):
    reader, grid = slide_grid
    norm, warning = fit_slide_stain(reader, grid)
    again, _ = fit_slide_stain(reader, grid)
    assert warning is None and norm is not None
    np.testing.assert_array_equal(norm.source.stain_matrix, again.source.stain_matrix)  # seeded
    # The sample must stand for all tissue tiles as the model sees them.
    tiles = np.concatenate([read_block(reader, grid, b).tiles for b in grid.blocks])
    full = fit_macenko(tiles.reshape(-1, 3))
    cos = np.sum(norm.source.stain_matrix * full.stain_matrix, axis=0)
    assert cos.min() > 0.99
    np.testing.assert_allclose(norm.source.max_conc, full.max_conc, rtol=0.1)


def test_stain_fit_without_tissue_tiles_warns(slide_grid):
    reader, grid = slide_grid
    empty = TileGrid(grid.config, grid.level, grid.level_downsample, grid.slide_mpp, grid.level0_size,
                     np.zeros_like(grid.tissue_fraction))
    norm, warning = fit_slide_stain(reader, empty)
    assert norm is None and "no tissue" in warning


def test_small_slide_stain_fit_comes_from_the_block_reads(slide_grid):
    """<= SAMPLE_TILES tissue tiles: the fit uses the loop's block reads (one decode) and matches
    the fit from single-tile reads of the same tiles."""
    from wsi_cmaf.infer.stainfit import SAMPLE_TILES, fit_from_blocks, sample_is_all_tissue

    reader, grid = slide_grid
    frac = grid.tissue_fraction.copy()
    keep = np.flatnonzero(grid.tissue.ravel())[:40]
    small_frac = np.zeros_like(frac).ravel()
    small_frac[keep] = frac.ravel()[keep]
    small = TileGrid(grid.config, grid.level, grid.level_downsample, grid.slide_mpp, grid.level0_size,
                     small_frac.reshape(frac.shape))
    assert sample_is_all_tissue(small) and small.n_tissue == min(40, grid.n_tissue) <= SAMPLE_TILES
    blocks_fit, warning = fit_from_blocks(small, [read_block(reader, small, b) for b in small.blocks])
    tiles_fit, _ = fit_slide_stain(reader, small)
    assert warning is None
    cos = np.sum(blocks_fit.source.stain_matrix * tiles_fit.source.stain_matrix, axis=0)
    assert cos.min() > 0.999
    np.testing.assert_allclose(blocks_fit.source.max_conc, tiles_fit.source.max_conc, rtol=0.02)
    full = TileGrid(grid.config, grid.level, grid.level_downsample, grid.slide_mpp, grid.level0_size,
                    np.ones_like(frac))  # 192 tissue tiles: sampled, not all read
    assert not sample_is_all_tissue(full)
    with pytest.raises(ValueError):
        fit_from_blocks(full, [])
