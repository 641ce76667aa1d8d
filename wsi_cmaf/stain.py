"""Macenko stain normalisation shared by inference and training.

Two steps, deliberately separated:

1. :func:`fit_macenko` estimates a slide's (or a patient's) H&E stain matrix ONCE from a
   sample of its tissue pixels, with torchstain's Macenko implementation.
2. :class:`MacenkoNormalizer` applies that fixed matrix to batches of tiles on any device.

Why not simply call ``torchstain``'s ``normalize()`` per tile: it refits the stain matrix
on every image, which (a) is unstable on small, nearly homogeneous 50x50 patches,
(b) lets the normalisation of a tile depend on its content (the same nucleus looks
different in two tiles) and (c) costs an eigendecomposition per tile. With the source
matrix fixed, colour deconvolution reduces to a least-squares solve against a constant
3x2 matrix, i.e. one multiplication by its pseudo-inverse (``torch.linalg.lstsq`` in
torchstain gives the same solution for a full-rank matrix), which batches trivially.

Conventions follow torchstain exactly (``Io=240``, ``alpha=1``, ``beta=0.15``,
reference ``HERef``/``maxCRef``), so a tile normalised with its own fit here equals
torchstain's ``normalize()`` output up to its final integer truncation.

Background: pixels whose optical density is below ``beta`` in any channel (white glass,
fat) are excluded from the FIT. The APPLY step transforms every pixel like torchstain
does; white maps to about ``Io`` (240), which is what the reference appearance expects.

Degenerate fits (too few tissue pixels, colours with no spread, parallel or non-physical
stain vectors) raise :class:`~wsi_cmaf.errors.StainFitError`. We raise rather than
silently return identity so the caller decides and reports it: inference skips
normalisation for that slide with a warning in the run report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from wsi_cmaf.errors import StainFitError

logger = logging.getLogger(__name__)

#: transmitted light intensity, OD threshold and angle percentile (torchstain defaults).
IO = 240.0
BETA = 0.15
ALPHA = 1.0
#: fewer tissue pixels than this give unstable eigenvectors and percentiles.
MIN_TISSUE_PIXELS = 500
#: stain vectors closer than this (degrees) cannot be separated.
MIN_STAIN_ANGLE_DEG = 3.0


@dataclass(frozen=True)
class StainFit:
    """A fitted Macenko stain model.

    ``stain_matrix``: (3, 2) float32, columns = unit OD vectors of haematoxylin and eosin.
    ``max_conc``: (2,) float32, 99th-percentile concentration of each stain.
    ``n_pixels``: tissue pixels the fit used (0 for the reference).
    """

    stain_matrix: np.ndarray
    max_conc: np.ndarray
    n_pixels: int = 0

    def to_dict(self) -> dict:
        """JSON-serialisable form (for run reports and stores)."""
        return {
            "stain_matrix": np.asarray(self.stain_matrix, dtype=float).tolist(),
            "max_conc": np.asarray(self.max_conc, dtype=float).tolist(),
            "n_pixels": int(self.n_pixels),
        }

    @classmethod
    def from_dict(cls, data: dict) -> StainFit:
        """Inverse of :meth:`to_dict`."""
        return cls(
            np.asarray(data["stain_matrix"], dtype=np.float32).reshape(3, 2),
            np.asarray(data["max_conc"], dtype=np.float32).reshape(2),
            int(data.get("n_pixels", 0)),
        )


def reference_fit() -> StainFit:
    """torchstain's default reference stain matrix and maximum concentrations."""
    from torchstain.torch.normalizers.macenko import TorchMacenkoNormalizer

    ref = TorchMacenkoNormalizer()
    return StainFit(
        ref.HERef.numpy().astype(np.float32), ref.maxCRef.numpy().astype(np.float32), 0
    )


def tissue_pixel_mask(pixels: np.ndarray, io: float = IO, beta: float = BETA) -> np.ndarray:
    """Boolean mask of pixels whose optical density is >= ``beta`` in every channel."""
    flat = np.asarray(pixels).reshape(-1, 3).astype(np.float32)
    od = -np.log((flat + 1.0) / io)
    return ~np.any(od < beta, axis=1)


def _check_fit(he: np.ndarray, max_c: np.ndarray) -> np.ndarray:
    """Validate a fitted matrix; returns it (sign-corrected) or raises StainFitError."""
    if not (np.all(np.isfinite(he)) and np.all(np.isfinite(max_c))):
        raise StainFitError("Macenko fit produced non-finite values (colours without spread?)")
    # Eigenvectors have an arbitrary sign; an all-negative OD vector is the same stain.
    for j in range(2):
        if np.all(he[:, j] <= 0):
            he[:, j] = -he[:, j]
    if np.any(he < -0.05):
        raise StainFitError(
            f"Macenko fit gave a non-physical stain vector (negative optical density): {he.T.round(3).tolist()}"
        )
    cos = float(he[:, 0] @ he[:, 1] / (np.linalg.norm(he[:, 0]) * np.linalg.norm(he[:, 1])))
    angle = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    if angle < MIN_STAIN_ANGLE_DEG:
        raise StainFitError(f"stain vectors are nearly parallel ({angle:.2f} deg); cannot separate H and E")
    if np.any(max_c <= 1e-6):
        raise StainFitError(f"fitted maximum stain concentrations are not positive: {max_c.tolist()}")
    return he


def fit_macenko(
    pixels: np.ndarray,
    *,
    io: float = IO,
    alpha: float = ALPHA,
    beta: float = BETA,
    min_tissue_pixels: int = MIN_TISSUE_PIXELS,
) -> StainFit:
    """Fit a Macenko stain matrix to RGB uint8 pixels, shape (N, 3) or (H, W, 3).

    Uses torchstain's torch backend for the fit itself. Raises
    :class:`~wsi_cmaf.errors.StainFitError` when fewer than ``min_tissue_pixels`` pixels
    pass the OD threshold or when the fitted vectors are degenerate.
    """
    from torchstain.torch.normalizers.macenko import TorchMacenkoNormalizer

    arr = np.asarray(pixels)
    if arr.ndim < 2 or arr.shape[-1] != 3:
        raise StainFitError(f"expected RGB pixels of shape (N, 3) or (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise StainFitError(f"expected uint8 RGB pixels, got dtype {arr.dtype}")
    flat = arr.reshape(-1, 3)
    n_tissue = int(tissue_pixel_mask(flat, io, beta).sum())
    if n_tissue < min_tissue_pixels:
        raise StainFitError(
            f"only {n_tissue} tissue pixels (OD >= {beta} in every channel) among {len(flat)}; "
            f"need at least {min_tissue_pixels} to fit a stain matrix"
        )
    # torchstain expects a (C, H, W) image; a (3, N, 1) column is the same pixels.
    image = torch.from_numpy(np.ascontiguousarray(flat.T)).unsqueeze(-1)
    norm = TorchMacenkoNormalizer()
    try:
        norm.fit(image, Io=io, alpha=alpha, beta=beta)
    except (RuntimeError, torch.linalg.LinAlgError) as exc:  # eigh/lstsq failures
        raise StainFitError(f"Macenko fit failed: {exc}") from exc
    he = norm.HERef.detach().cpu().numpy().astype(np.float32).copy()
    max_c = norm.maxCRef.detach().cpu().numpy().astype(np.float32).copy()
    he = _check_fit(he, max_c)
    logger.debug("Macenko fit on %d tissue pixels: HE=%s maxC=%s", n_tissue, he.T.tolist(), max_c.tolist())
    return StainFit(he, max_c, n_tissue)


class MacenkoNormalizer(nn.Module):
    """Batched Macenko normalisation with a fixed, pre-fitted source stain matrix.

    ``forward(x)``: float (B, 3, H, W) or (3, H, W) in [0, 255] (uint8 is accepted too) on
    any device -> same shape in [0, 255]. Half/bfloat16 input is computed in float32 and
    cast back; uint8 input returns float32. All matrices are buffers, so ``.to(device)``
    moves them with the module.
    """

    # buffers (register_buffer), typed here: nn.Module types unknown attributes Tensor | Module
    ref_matrix: torch.Tensor
    ref_max_conc: torch.Tensor
    src_pinv: torch.Tensor
    src_scale: torch.Tensor
    od_map: torch.Tensor

    def __init__(self, reference: StainFit | None = None, io: float = IO) -> None:
        super().__init__()
        ref = reference if reference is not None else reference_fit()
        self.io = float(io)
        self.register_buffer("ref_matrix", torch.as_tensor(ref.stain_matrix, dtype=torch.float32).clone())
        self.register_buffer("ref_max_conc", torch.as_tensor(ref.max_conc, dtype=torch.float32).clone())
        self.register_buffer("src_pinv", torch.zeros(2, 3))
        self.register_buffer("src_scale", torch.ones(2))
        #: ref_matrix @ diag(src_scale) @ src_pinv: the whole OD -> OD map as one 3x3 matrix.
        self.register_buffer("od_map", torch.zeros(3, 3))
        self.source: StainFit | None = None

    def set_source(self, fit: StainFit) -> MacenkoNormalizer:
        """Use ``fit`` as the source stain model; returns self for chaining."""
        he = np.asarray(fit.stain_matrix, dtype=np.float64).reshape(3, 2)
        # pinv in float64 on CPU: the least-squares solution of OD = HE @ C for fixed HE.
        pinv = np.linalg.pinv(he)
        scale = np.asarray(self.ref_max_conc.cpu(), dtype=np.float64) / np.asarray(fit.max_conc, np.float64)
        self.src_pinv.copy_(torch.as_tensor(pinv, dtype=torch.float32))
        self.src_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
        ref = np.asarray(self.ref_matrix.cpu(), dtype=np.float64)
        self.od_map.copy_(torch.as_tensor(ref @ np.diag(scale) @ pinv, dtype=torch.float32))
        self.source = fit
        return self

    @property
    def fitted(self) -> bool:
        """Whether a source stain model has been set."""
        return self.source is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch of RGB images (channels first) to the reference stain appearance."""
        if self.source is None:
            raise RuntimeError("MacenkoNormalizer.set_source(fit) must be called before use")
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        # float16/bfloat16 lose too much precision in log/exp of optical densities and
        # autocast would downcast the einsums: force float32 math.
        with torch.autocast(device_type=x.device.type, enabled=False):
            # Deconvolve with the source pseudo-inverse, rescale the concentrations, re-colour
            # with the reference matrix: all linear in OD, so one 3x3 product per pixel
            # (od_map, precomputed in set_source) instead of two; ~40 % less time per batch.
            # one new tensor, then in place: each fresh batch-sized tensor costs page faults
            neg_od = x.float().add(1.0).mul_(1.0 / self.io).log_()
            out = torch.matmul(self.od_map, neg_od.flatten(2)).view_as(neg_od)
            out = out.exp_().mul_(self.io).clamp_(0.0, 255.0)
        out = out.to(out_dtype)
        return out.squeeze(0) if squeeze else out

    def extra_repr(self) -> str:
        return f"io={self.io}, fitted={self.fitted}"
