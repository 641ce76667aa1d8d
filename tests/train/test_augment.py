"""Batched, seeded augmentation (wsi_cmaf.train.data.augment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed

from wsi_cmaf.stain import MacenkoNormalizer, fit_macenko
from wsi_cmaf.train.data.augment import AugmentConfig, BatchAugment, PatientStainNormalizer, hed_to_rgb, rgb_to_hed
from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, generate_patches

OFF = dict(flips=False, rot90=False, rotation_deg=0.0, elastic_px=0.0, hed_sigma=0.0, hed_bias=0.0,
           brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


@pytest.fixture(scope="module")
def patches():
    d = generate_patches(SyntheticPatchConfig(n_patients=2, patches_per_patient=8, seed=1))
    return d, torch.from_numpy(d.images).permute(0, 3, 1, 2).float()


def test_hed_conversion_matches_skimage(patches):
    d, x = patches
    ours = rgb_to_hed(x).permute(0, 2, 3, 1).numpy()
    ref = rgb2hed(d.images)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    back = hed_to_rgb(torch.from_numpy(ref).permute(0, 3, 1, 2).float()).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(back, hed2rgb(ref) * 255, atol=1e-2)


def test_everything_off_is_identity_and_eval_mode_is_identity(patches):
    _, x = patches
    assert torch.allclose(BatchAugment(AugmentConfig(**OFF))(x), x)
    aug = BatchAugment().eval()
    assert aug(x) is x


def test_default_output_shape_range_and_seeding(patches):
    _, x = patches
    a = BatchAugment(seed=3)(x)
    b = BatchAugment(seed=3)(x)
    c = BatchAugment(seed=4)(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 255
    assert torch.equal(a, b) and not torch.equal(a, c)
    aug = BatchAugment(seed=3)
    first = aug(x)
    assert not torch.equal(aug(x), first)  # the stream advances between batches
    aug.reseed(3)
    assert torch.equal(aug(x), first)


def test_parameters_are_drawn_per_sample(patches):
    _, x = patches
    twin = x[:1].repeat(4, 1, 1, 1)
    out = BatchAugment(seed=0)(twin)
    assert not torch.allclose(out[0], out[1])


def test_flips_and_right_angles_are_exact_dihedral_transforms(patches):
    _, x = patches
    out = BatchAugment(AugmentConfig(**{**OFF, "flips": True, "rot90": True}), seed=0)(x)
    for xi, oi in zip(x, out):
        candidates = [torch.rot90(t, k, (1, 2)) for t in (xi, xi.flip(2)) for k in range(4)]
        assert min((c - oi).abs().max().item() for c in candidates) < 1e-3


def test_small_rotation_keeps_the_centre_and_moves_the_rest():
    x = torch.rand(8, 3, 51, 51, generator=torch.Generator().manual_seed(0)) * 255
    out = BatchAugment(AugmentConfig(**{**OFF, "rotation_deg": 30.0}), seed=0)(x)
    torch.testing.assert_close(out[..., 25, 25], x[..., 25, 25], atol=1e-3, rtol=0)
    assert (out - x).abs().mean() > 10


def test_elastic_displacement_is_bounded():
    # A horizontal ramp of slope 2/px: displacing by at most d px changes values by at most 2d.
    ramp = (torch.arange(50).float() * 2 + 20).view(1, 1, 1, 50).expand(6, 3, 50, 50).contiguous()
    cfg = AugmentConfig(**{**OFF, "elastic_px": 1.5, "elastic_p": 1.0})
    out = BatchAugment(cfg, seed=0)(ramp)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    diff = (out - ramp)[inner].abs()
    assert diff.max() <= 2 * 1.5 + 1e-3
    assert diff.mean() > 0.2


def test_hed_jitter_changes_stain_but_stays_close(patches):
    _, x = patches
    out = BatchAugment(AugmentConfig(**{**OFF, "hed_sigma": 0.05, "hed_bias": 0.02}), seed=0)(x)
    delta = (out - x).abs().mean()
    assert 0.5 < delta < 25


def test_half_precision_batches(patches):
    _, x = patches
    out = BatchAugment(seed=0)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_patient_stain_normalizer(patches):
    d, x = patches
    white = np.full((3, 50, 50, 3), 250, np.uint8)
    images = np.concatenate([d.images, white])
    pids = np.concatenate([d.patient_ids, ["blank"] * 3])
    psn = PatientStainNormalizer().fit(images, pids)
    assert list(psn.failed) == ["blank"]
    xx = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    out = psn(xx, pids)
    torch.testing.assert_close(out[-3:], xx[-3:])
    sel = pids == "syn0001"
    own = MacenkoNormalizer().set_source(fit_macenko(d.images[d.patient_ids == "syn0001"]))
    torch.testing.assert_close(out[torch.from_numpy(sel)], own(xx[torch.from_numpy(sel)]))
