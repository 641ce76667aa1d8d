"""Macenko stain fit and batched normalisation (wsi_cmaf.stain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_cmaf.errors import StainFitError, WsiCmafError
from wsi_cmaf.stain import MacenkoNormalizer, StainFit, fit_macenko, reference_fit
from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, patient_params, render_patches


def _patient_images(seed: int, n: int = 24) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    params = patient_params(rng, 1.0)
    return render_patches(np.array([0, 1] * (n // 2)), SyntheticPatchConfig(), rng, params), params


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_the_stain_vectors_the_patches_were_rendered_with(seed):
    images, params = _patient_images(seed)
    fit = fit_macenko(images)
    he = fit.stain_matrix
    assert he.shape == (3, 2) and fit.max_conc.shape == (2,)
    np.testing.assert_allclose(np.linalg.norm(he, axis=0), 1.0, atol=1e-4)
    assert he[:, 0] @ params["h_vec"] > 0.97, "first column must be haematoxylin"
    assert he[:, 1] @ params["e_vec"] > 0.97, "second column must be eosin"
    assert fit.n_pixels > 1000


def test_own_fit_as_reference_roughly_returns_the_image():
    images, _ = _patient_images(3)
    fit = fit_macenko(images)
    norm = MacenkoNormalizer(reference=fit).set_source(fit)
    x = _nchw(images)
    y = norm(x)
    # Pixels brighter than Io=240 are clipped to about Io by Macenko's model: compare the others.
    keep = (x < 235).all(dim=1, keepdim=True).expand_as(x)
    assert (y[keep] - x[keep]).abs().mean() < 1.5
    # what remains is the pixel noise orthogonal to the H-E plane, which Macenko projects out
    assert torch.quantile((y[keep] - x[keep]).abs(), 0.99) < 5


def test_batched_apply_equals_per_image_apply():
    images, _ = _patient_images(4, n=8)
    norm = MacenkoNormalizer().set_source(fit_macenko(images))
    x = _nchw(images)
    batched = norm(x)
    single = torch.stack([norm(img) for img in x])  # (3, H, W) inputs are accepted too
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-3)


def test_matches_torchstain_normalize_when_source_is_the_image_itself():
    from torchstain.torch.normalizers.macenko import TorchMacenkoNormalizer

    images, _ = _patient_images(5, n=4)
    tile = np.concatenate(list(images), axis=1)  # one 50x200 image
    ours = MacenkoNormalizer().set_source(fit_macenko(tile))(_nchw(tile[None]))[0]
    ref, _, _ = TorchMacenkoNormalizer().normalize(torch.from_numpy(tile).permute(2, 0, 1), stains=False)
    # torchstain truncates to int at the end; we keep floats.
    diff = (ours.permute(1, 2, 0) - ref.float()).abs()
    assert diff.max() <= 1.01


def test_normalised_patients_refit_to_the_reference_stains():
    ref = reference_fit()
    before, after = [], []
    for seed in (12, 13):
        images, _ = _patient_images(seed)
        fit = fit_macenko(images)
        out = MacenkoNormalizer().set_source(fit)(_nchw(images))
        refit = fit_macenko(out.round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        before.append((fit.stain_matrix * ref.stain_matrix).sum(0).min())
        after.append((refit.stain_matrix * ref.stain_matrix).sum(0).min())
        np.testing.assert_allclose(refit.max_conc, ref.max_conc, rtol=0.1)
    assert min(before) < 0.99, "test patients should start away from the reference"
    assert min(after) > 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_computed_in_float32(dtype):
    images, _ = _patient_images(6, n=4)
    norm = MacenkoNormalizer().set_source(fit_macenko(images))
    x = _nchw(images)
    ref = norm(x)
    out = norm(x.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    # error budget: rounding of the input and output to the half format (bf16: 8 bits mantissa)
    tol = 1.0 if dtype == torch.float16 else 4.0
    assert (out.float() - ref).abs().max() <= tol


def test_uint8_input_gives_float32_and_state_dict_carries_the_fit():
    images, _ = _patient_images(7, n=2)
    norm = MacenkoNormalizer().set_source(fit_macenko(images))
    out = norm(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255
    assert {"ref_matrix", "ref_max_conc", "src_pinv", "src_scale"} <= set(norm.state_dict())


def test_unfitted_normalizer_refuses():
    with pytest.raises(RuntimeError, match="set_source"):
        MacenkoNormalizer()(torch.zeros(1, 3, 4, 4))


def test_white_image_is_a_named_error():
    with pytest.raises(StainFitError, match="tissue pixels"):
        fit_macenko(np.full((64, 64, 3), 250, np.uint8))


def test_single_colour_tissue_is_a_named_error():
    # No colour spread: the two Macenko extremes coincide and H/E cannot be separated.
    with pytest.raises(StainFitError):
        fit_macenko(np.tile(np.array([150, 80, 160], np.uint8), (64, 64, 1)))


def test_bad_pixel_input_is_rejected():
    with pytest.raises(WsiCmafError):
        fit_macenko(np.zeros((10, 4), np.uint8))
    with pytest.raises(WsiCmafError):
        fit_macenko(np.zeros((10, 3), np.float32))


def test_stainfit_round_trips_through_dict_and_reference_is_torchstains():
    fit = fit_macenko(_patient_images(8)[0])
    back = StainFit.from_dict(fit.to_dict())
    np.testing.assert_allclose(back.stain_matrix, fit.stain_matrix)
    np.testing.assert_allclose(back.max_conc, fit.max_conc)
    ref = reference_fit()
    np.testing.assert_allclose(ref.stain_matrix[:, 0], [0.5626, 0.7201, 0.4062], atol=1e-4)
