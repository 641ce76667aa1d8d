"""Batched, seeded training augmentation for H&E patches (torch, any device).

Input and output: float (B, 3, H, W) in [0, 255] (the convention of ``wsi_cmaf.stain`` and
the inference preprocessor). Apply on whole batches in the training loop, on the GPU
when there is one, rather than per sample in DataLoader workers (which would also
duplicate random streams across workers).

Order: stain transfer (optional) -> HED stain jitter -> colour jitter -> geometry (flips, 90-degree turns, rotation
+-30 degrees and elastic deformation composed into ONE ``grid_sample`` so pixels are
interpolated once). Every random number comes from a CPU ``torch.Generator`` owned by the
module, so a seed gives the same augmentation on CPU and GPU.

Colour jitter is hand-rolled (torchvision's functional ops take one factor per call, not
one per sample); hue is a rotation of the chroma plane in YIQ space, which is linear and
therefore batches as one 3x3 matrix per sample. HED conversion uses scikit-image's
Ruifrok-Johnston matrices and the same log convention as ``skimage.color.rgb2hed``.

Stain transfer (``stain_transfer_p``) re-renders a sample in the Macenko stain (matrix and
maximum concentrations) of a randomly drawn *training* patient: the paper's augmentation
transfers stains between slides (it cites adversarial stain transfer; this is the Macenko
form, MODEL.md). The batch must be in a known stain, i.e. Macenko-normalised to the reference:
deconvolve with the reference, rescale the concentrations, re-colour with the drawn stain,
which is one 3x3 map in optical density per sample, so the whole batch is one ``bmm``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.stain import IO, MacenkoNormalizer, StainFit

logger = logging.getLogger(__name__)

_LOG_ADJUST = math.log(1e-6)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hed_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

    return (torch.as_tensor(hed_from_rgb, dtype=torch.float32),
            torch.as_tensor(rgb_from_hed, dtype=torch.float32))


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 255] -> HED stain concentrations (as ``skimage.color.rgb2hed``)."""
    hed_from_rgb, _ = _hed_matrices()
    rgb = (x.float() / 255.0).clamp_min(1e-6)
    stains = torch.einsum("bchw,cd->bdhw", torch.log(rgb) / _LOG_ADJUST, hed_from_rgb.to(x.device, non_blocking=True))
    return stains.clamp_min(0.0)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (as ``skimage.color.hed2rgb``), RGB in [0, 255]."""
    _, rgb_from_hed = _hed_matrices()
    log_rgb = -torch.einsum("bdhw,dc->bchw", hed * -_LOG_ADJUST, rgb_from_hed.to(hed.device, non_blocking=True))
    return (torch.exp(log_rgb).clamp(0.0, 1.0)) * 255.0


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; 0 / False switches a part off. Defaults are histology-safe."""

    flips: bool = True
    rot90: bool = True
    rotation_deg: float = 30.0
    elastic_px: float = 1.5          # max displacement of the smooth elastic field, in pixels
    elastic_grid: int = 5            # control points per side of that field
    elastic_p: float = 0.5
    hed_sigma: float = 0.05          # multiplicative HED jitter: U(1 - s, 1 + s)
    hed_bias: float = 0.02           # additive HED jitter: U(-b, b)
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.03                # fraction of a full hue turn
    padding_mode: str = "reflection"
    stain_transfer_p: float = 0.0    # chance a sample takes a drawn training patient's stain; 0 = off

    def __post_init__(self) -> None:
        if not 0.0 <= self.stain_transfer_p <= 1.0:
            raise ConfigError(f"augment stain_transfer_p must be in [0, 1], got {self.stain_transfer_p}")


class BatchAugment(nn.Module):
    """Seeded batch augmentation: ``forward(x)`` with x float (B, 3, H, W) in [0, 255]."""

    stain_maps: torch.Tensor

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config or AugmentConfig()
        self.generator = torch.Generator().manual_seed(int(seed))
        # stain transfer: per-reference OD maps from the source (normalisation reference) stain,
        # (K, 3, 3); empty until set_stain_references (then the option is a no-op)
        self.register_buffer("stain_maps", torch.zeros(0, 3, 3), persistent=False)

    def set_stain_references(self, source: StainFit, references: list[StainFit]) -> BatchAugment:
        """Stains to transfer onto: ``source`` is the stain the batches arrive in (the Macenko
        normalisation reference), ``references`` the training patients' fits."""
        import numpy as np

        src_pinv = np.linalg.pinv(np.asarray(source.stain_matrix, np.float64).reshape(3, 2))
        src_max = np.asarray(source.max_conc, np.float64).reshape(2)
        maps = [np.asarray(r.stain_matrix, np.float64).reshape(3, 2)
                @ np.diag(np.asarray(r.max_conc, np.float64).reshape(2) / src_max) @ src_pinv
                for r in references]
        device = self.stain_maps.device
        self.stain_maps = torch.as_tensor(np.stack(maps) if maps else np.zeros((0, 3, 3)),
                                          dtype=torch.float32, device=device)
        return self

    def reseed(self, seed: int) -> None:
        """Restart the random stream (e.g. at each epoch: ``reseed(base_seed + epoch)``)."""
        self.generator.manual_seed(int(seed))

    def _u(self, b: int, low: float, high: float, device: torch.device, k: int = 1) -> torch.Tensor:
        r = torch.rand((b, k), generator=self.generator)
        # Draws stay on the CPU generator (reproducible across devices). non_blocking: a blocking
        # copy would wait for all the device's queued work at every draw; a small pageable
        # source is staged at once, so it may be freed after the call.
        return (low + (high - low) * r).to(device, non_blocking=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a batch; output has x's shape and dtype, values in [0, 255]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
        if not self.training:
            return x
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = x.float()
            y = self.stain_transfer(y)
            y = self.hed_jitter(y)
            y = self.color_jitter(y)
            y = self.geometry(y)
        return y.clamp_(0.0, 255.0).to(dtype)

    def stain_transfer(self, x: torch.Tensor) -> torch.Tensor:
        """Macenko stain transfer: each sample, with probability ``stain_transfer_p``, takes the
        stain of a uniformly drawn reference (see :meth:`set_stain_references`)."""
        p, k = self.config.stain_transfer_p, self.stain_maps.shape[0]
        if p <= 0 or k == 0:
            return x
        b = x.shape[0]
        # both draws always happen, so the random stream does not depend on the outcome
        use = (torch.rand(b, generator=self.generator) < p).to(x.device, non_blocking=True)
        pick = torch.randint(k, (b,), generator=self.generator).to(x.device, non_blocking=True)
        # torchstain's convention (as MacenkoNormalizer): -OD = log((I + 1) / Io), linear map, back
        neg_od = x.add(1.0).mul_(1.0 / IO).log_()
        out = torch.bmm(self.stain_maps[pick], neg_od.flatten(2)).view_as(x)
        out = out.exp_().mul_(IO).clamp_(0.0, 255.0)
        return torch.where(use[:, None, None, None], out, x)

    def hed_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Tellez-style stain augmentation: per-sample, per-stain scale and shift in HED space."""
        c = self.config
        if c.hed_sigma <= 0 and c.hed_bias <= 0:
            return x
        b = x.shape[0]
        scale = self._u(b, 1 - c.hed_sigma, 1 + c.hed_sigma, x.device, 3)[..., None, None]
        shift = self._u(b, -c.hed_bias, c.hed_bias, x.device, 3)[..., None, None]
        return hed_to_rgb(rgb_to_hed(x) * scale + shift)

    def color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample brightness, contrast, saturation and hue jitter."""
        c = self.config
        b, dev = x.shape[0], x.device
        if c.brightness > 0:
            x = x * self._u(b, 1 - c.brightness, 1 + c.brightness, dev)[..., None, None]
        if c.contrast > 0:
            luma = _RGB2YIQ[0].to(dev, non_blocking=True).view(1, 3, 1, 1)
            mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            f = self._u(b, 1 - c.contrast, 1 + c.contrast, dev)[..., None, None]
            x = mean + f * (x - mean)
        if c.saturation > 0 or c.hue > 0:
            # One 3x3 matrix per sample: RGB->YIQ, scale chroma (saturation), rotate it (hue), back.
            sat = self._u(b, 1 - c.saturation, 1 + c.saturation, dev)[:, 0]
            ang = self._u(b, -c.hue, c.hue, dev)[:, 0] * 2 * math.pi
            cos, sin = torch.cos(ang) * sat, torch.sin(ang) * sat
            m = torch.zeros(b, 3, 3, device=dev)
            m[:, 0, 0] = 1.0
            m[:, 1, 1], m[:, 1, 2], m[:, 2, 1], m[:, 2, 2] = cos, -sin, sin, cos
            yiq = _RGB2YIQ.to(dev, non_blocking=True)
            full = torch.linalg.inv(yiq) @ m @ yiq
            x = torch.einsum("bij,bjhw->bihw", full, x)
        return x.clamp(0.0, 255.0)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Flips, 90-degree turns, small rotation and elastic deformation in one resampling."""
        c = self.config
        b, _, h, w = x.shape
        g = self.generator
        angle = torch.zeros(b)
        if c.rot90:
            angle += torch.randint(0, 4, (b,), generator=g).float() * (math.pi / 2)
        if c.rotation_deg > 0:
            angle += (torch.rand(b, generator=g) * 2 - 1) * math.radians(c.rotation_deg)
        sx = torch.ones(b)
        sy = torch.ones(b)
        if c.flips:
            sx = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
            sy = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        elastic = c.elastic_px > 0 and c.elastic_p > 0
        if elastic:
            coarse = torch.randn((b, 2, c.elastic_grid, c.elastic_grid), generator=g)
            use = (torch.rand(b, generator=g) < c.elastic_p).float().view(b, 1, 1, 1)
        if not (c.rot90 or c.rotation_deg > 0 or c.flips or elastic):
            return x
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos * sx, -sin * sy, torch.zeros(b)], 1),
                             torch.stack([sin * sx, cos * sy, torch.zeros(b)], 1)], 1)
        grid = F.affine_grid(theta.to(x.device, non_blocking=True), [b, 3, h, w], align_corners=False)
        if elastic:
            field = F.interpolate(coarse.to(x.device, non_blocking=True), size=(h, w), mode="bicubic",
                                  align_corners=False)
            field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            # pixels -> normalised grid units (2 / size per pixel)
            scale = torch.tensor([2.0 * c.elastic_px / w, 2.0 * c.elastic_px / h]).to(x.device, non_blocking=True)
            grid = grid + field.permute(0, 2, 3, 1) * scale * use.to(x.device, non_blocking=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=c.padding_mode, align_corners=False)


class PatientStainNormalizer(nn.Module):
    """Macenko normalisation with one stain fit per patient (as inference fits one per slide).

    ``fit(images, patient_ids)`` fits each patient from its patches' pixels; patients whose
    fit fails (too little tissue, degenerate colours) are passed through unchanged and
    listed in ``failed``. ``forward(x, patient_ids)`` normalises a batch group by group.
    """

    def __init__(self, reference: StainFit | None = None, max_pixels: int = 200_000, seed: int = 0) -> None:
        super().__init__()
        self.reference = reference
        self.max_pixels = int(max_pixels)
        self.seed = int(seed)
        # ModuleDict keys may not contain '.', patient ids may: map ids to safe keys.
        self.normalizers = nn.ModuleDict()
        self._keys: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def fit(self, images, patient_ids) -> PatientStainNormalizer:
        """Fit per patient from uint8 (N, H, W, 3) images and one patient id per image."""
        import numpy as np

        from wsi_cmaf.errors import StainFitError
        from wsi_cmaf.stain import fit_macenko

        images, pids = np.asarray(images), np.asarray(patient_ids).astype(str)
        rng = np.random.default_rng(self.seed)
        for pid in sorted(set(pids.tolist())):
            pixels = images[pids == pid].reshape(-1, 3)
            if len(pixels) > self.max_pixels:
                pixels = pixels[np.sort(rng.choice(len(pixels), self.max_pixels, replace=False))]
            try:
                fit = fit_macenko(pixels)
            except StainFitError as exc:
                self.failed[pid] = str(exc)
                logger.warning("patient %s: no stain normalisation (%s)", pid, exc)
                continue
            self._keys[pid] = f"p{len(self._keys)}"
            self.normalizers[self._keys[pid]] = MacenkoNormalizer(self.reference).set_source(fit)
        return self

    def fits(self, patient_ids) -> list[StainFit]:
        """The stain fits of ``patient_ids`` (patients without a fit are left out)."""
        keys = [self._keys[p] for p in sorted({str(p) for p in patient_ids}) if p in self._keys]
        return [self.normalizers[k].source for k in keys]  # type: ignore[misc]

    @property
    def target(self) -> StainFit:
        """The stain every normalised patch is rendered in (the reference)."""
        from wsi_cmaf.stain import reference_fit

        return self.reference if self.reference is not None else reference_fit()

    def forward(self, x: torch.Tensor, patient_ids) -> torch.Tensor:
        """Normalise each sample with its patient's fit (unchanged where there is none)."""
        out = x.clone() if x.is_floating_point() else x.float()
        pids = [str(p) for p in patient_ids]
        for pid in sorted(set(pids)):
            if pid not in self._keys:
                continue
            rows = torch.tensor([i for i, p in enumerate(pids) if p == pid]).to(x.device, non_blocking=True)
            out[rows] = self.normalizers[self._keys[pid]](x[rows]).to(out.dtype)
        return out
