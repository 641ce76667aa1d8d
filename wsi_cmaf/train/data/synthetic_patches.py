"""Synthetic H&E-like patches with a controllable, subtle class signal.

Each patch is rendered in optical-density space (Beer-Lambert): a haematoxylin map
(elliptical nuclei with chromatin texture over faint background) and an eosin map
(smooth stroma with white lumen/fat gaps) are mixed with a per-patient pair of stain
vectors and converted to RGB. What differs between the classes, scaled by ``signal``:

* malignant (1): more nuclei, larger and more variable (pleomorphic), darker, and more
  of them crowded around a cluster centre;
* benign (0): fewer, smaller, regular nuclei spread evenly.

Per-patient nuisance factors (stain vectors and intensities, background brightness,
nuclear density and size) are of the same order as the class effect at ``signal=0.5``,
so a classifier must learn the class cue, not the patient's colour, and patient-level
splits matter. Everything is drawn from ``SeedSequence([seed, patient_index])``, so a
patient's patches do not depend on how many other patients are generated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.data.imbalance import parse_ratio

logger = logging.getLogger(__name__)

#: Base H and E optical-density vectors: typical H&E as fitted by Macenko (torchstain's
#: reference), less saturated than Ruifrok & Johnston's, so stroma looks like real slides.
_H_VEC = np.array([0.5626, 0.7201, 0.4062])
_E_VEC = np.array([0.2159, 0.8012, 0.5581])
_MAX_NUCLEI = 48
_CHUNK = 128  # patches rendered at once; bounds memory at (chunk, nuclei, H, W) float32


@dataclass(frozen=True)
class SyntheticPatchConfig:
    """What to generate. ``ratio`` is negative:positive over the whole set (exact counts)."""

    n_patients: int = 20
    patches_per_patient: int = 100
    ratio: str = "70:30"
    signal: float = 0.5
    stain_variation: float = 1.0
    patch_size: int = 50
    seed: int = 0
    patient_prefix: str = "syn"

    def __post_init__(self) -> None:
        if self.n_patients < 1 or self.patches_per_patient < 1:
            raise ConfigError("n_patients and patches_per_patient must be >= 1")
        if not 0.0 <= self.signal <= 2.0:
            raise ConfigError(f"signal must be in [0, 2], got {self.signal}")
        if self.patch_size < 16:
            raise ConfigError(f"patch_size must be >= 16, got {self.patch_size}")
        parse_ratio(self.ratio)

    @property
    def n_patches(self) -> int:
        """Total patches."""
        return self.n_patients * self.patches_per_patient

    def patient_id(self, index: int) -> str:
        """Patient id of patient ``index`` (IDC-layout safe: no underscores or slashes)."""
        return f"{self.patient_prefix}{index:04d}"

    def to_dict(self) -> dict:
        """Plain dict (for manifests' provenance and run logs)."""
        return asdict(self)


def plan_labels(config: SyntheticPatchConfig) -> list[np.ndarray]:
    """Per-patient label arrays with EXACTLY round(N * pos / (neg + pos)) positives overall.

    Patients differ in their positive fraction (gamma-distributed weights), like IDC.
    """
    neg, pos = parse_ratio(config.ratio)
    n = config.n_patches
    n_pos = int(round(n * pos / (neg + pos)))
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2**31 - 1]))
    weights = rng.gamma(2.0, 1.0, config.n_patients) + 0.05
    slot_w = np.repeat(weights, config.patches_per_patient)
    chosen = rng.choice(n, size=n_pos, replace=False, p=slot_w / slot_w.sum())
    labels = np.zeros(n, dtype=np.int64)
    labels[chosen] = 1
    return list(labels.reshape(config.n_patients, config.patches_per_patient))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, n: int, cells: int, size: int) -> torch.Tensor:
    """Smooth random fields (n, size, size) in ~N(0,1) by bicubic upsampling a coarse grid."""
    coarse = torch.from_numpy(rng.standard_normal((n, 1, cells, cells), dtype=np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def render_patches(labels: np.ndarray, config: SyntheticPatchConfig, rng: np.random.Generator,
                   patient: dict[str, np.ndarray | float]) -> np.ndarray:
    """Render patches for one patient: (n,) labels -> (n, S, S, 3) uint8 RGB."""
    out = []
    for start in range(0, len(labels), _CHUNK):
        out.append(_render_chunk(labels[start:start + _CHUNK], config, rng, patient))
    return np.concatenate(out) if out else np.zeros((0, config.patch_size, config.patch_size, 3), np.uint8)


def _render_chunk(labels: np.ndarray, config: SyntheticPatchConfig, rng: np.random.Generator,
                  patient: dict) -> np.ndarray:
    n, s, sig = len(labels), config.patch_size, float(config.signal)
    y = labels.astype(np.float32)
    area = (s / 50.0) ** 2
    # --- nuclei: count, size, shape, darkness, position -------------------------------
    lam = 9.0 * area * patient["density"] * (1.0 + 0.6 * sig * y)
    k = np.minimum(rng.poisson(lam), _MAX_NUCLEI)
    kmax = max(int(k.max()), 1)
    present = np.arange(kmax)[None, :] < k[:, None]
    r0 = 3.0 * patient["size"] * (1.0 + 0.22 * sig * y)[:, None]
    spread = 0.12 * (1.0 + 1.2 * sig * y)[:, None]
    a = np.clip(r0 * (1.0 + spread * rng.standard_normal((n, kmax))), 1.3, 9.0)
    b = a * rng.uniform(0.6, 1.0, (n, kmax))
    theta = rng.uniform(0.0, np.pi, (n, kmax))
    dark = np.clip(rng.normal(1.0 + 0.18 * sig * y[:, None], 0.15, (n, kmax)), 0.4, 2.0)
    crowd = rng.random((n, kmax)) < (0.2 + 0.5 * sig * y)[:, None]
    centre = rng.uniform(0.25 * s, 0.75 * s, (n, 1, 2))
    pos = np.where(crowd[..., None], centre + rng.normal(0.0, 0.14 * s, (n, kmax, 2)),
                   rng.uniform(0.0, s, (n, kmax, 2)))
    # --- render nuclei as soft ellipses (vectorised over patches x nuclei x pixels) --------
    t = lambda v: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))  # noqa: E731
    grid = torch.arange(s, dtype=torch.float32) + 0.5
    dx = grid.view(1, 1, 1, s) - t(pos[..., 0])[..., None, None]
    dy = grid.view(1, 1, s, 1) - t(pos[..., 1])[..., None, None]
    # Fold 1/a, 1/b into the small per-nucleus factors so only a few passes touch the
    # large (n, nuclei, S, S) tensor; the edge is a sigmoid of r^2 (no sqrt needed).
    ca, sa = t(np.cos(theta) / a)[..., None, None], t(np.sin(theta) / a)[..., None, None]
    cb, sb = t(np.cos(theta) / b)[..., None, None], t(np.sin(theta) / b)[..., None, None]
    u = dx * ca + dy * sa
    v = dy * cb - dx * sb
    r2 = torch.addcmul(u.mul_(u), v, v)
    sharp = t(a / 1.2)[..., None, None]  # ~0.6 px edge width whatever the radius
    soft = torch.sigmoid_(r2.mul_(-sharp).add_(sharp))
    soft.mul_(t(dark * present)[..., None, None])
    nuclei = soft.amax(dim=1)  # (n, s, s)
    chromatin = 1.0 + 0.25 * torch.from_numpy(rng.standard_normal((n, s, s), dtype=np.float32))
    h_conc = 0.95 * nuclei * chromatin.clamp(0.4, 1.6) + 0.08
    # --- stroma (eosin) with white gaps --------------------------------------------------------
    e_conc = 0.55 + 0.18 * _smooth_noise(rng, n, 6, s)
    gaps = torch.sigmoid((_smooth_noise(rng, n, 4, s) - 1.1) * 4.0)
    e_conc = e_conc.clamp(0.1, 1.2) * (1.0 - gaps)
    h_conc = h_conc * (1.0 - 0.85 * gaps * (1.0 - nuclei.clamp(0, 1)))
    # --- mix stains (Beer-Lambert) with this patient's vectors and intensities ----------------
    hv, ev = t(patient["h_vec"]) * patient["h_scale"], t(patient["e_vec"]) * patient["e_scale"]
    od = h_conc[..., None] * hv + e_conc[..., None] * ev  # (n, s, s, 3)
    rgb = patient["io"] * torch.exp(-od)
    rgb = rgb + torch.from_numpy(rng.normal(0.0, 2.0, (n, s, s, 3)).astype(np.float32))
    return rgb.clamp(0, 255).round().to(torch.uint8).numpy()


def patient_params(rng: np.random.Generator, stain_variation: float) -> dict:
    """Per-patient nuisance factors: stain vectors/intensities, brightness, density, size."""
    sv = float(stain_variation)
    return {
        "h_vec": _unit(np.abs(_unit(_H_VEC) + rng.normal(0.0, 0.07 * sv, 3))),
        "e_vec": _unit(np.abs(_unit(_E_VEC) + rng.normal(0.0, 0.07 * sv, 3))),
        "h_scale": float(np.exp(rng.normal(0.0, 0.15 * sv))),
        "e_scale": float(np.exp(rng.normal(0.0, 0.15 * sv))),
        "io": float(rng.uniform(232.0, 252.0)),
        "density": float(np.exp(rng.normal(0.0, 0.2))),
        "size": float(np.exp(rng.normal(0.0, 0.08))),
    }


@dataclass
class PatientPatches:
    """One patient's patches: images (n, S, S, 3) uint8, labels (n,), coords (n, 2) x, y."""

    patient_id: str
    images: np.ndarray
    labels: np.ndarray
    coords: np.ndarray


def iter_patients(config: SyntheticPatchConfig) -> Iterator[PatientPatches]:
    """Yield each patient's patches in order (deterministic per patient and seed)."""
    plans = plan_labels(config)
    s = config.patch_size
    for index, labels in enumerate(plans):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, index]))
        params = patient_params(rng, config.stain_variation)
        images = render_patches(labels, config, rng, params)
        # Distinct grid positions on a virtual slide, like IDC's x/y (multiples of the patch size).
        side = int(np.ceil(np.sqrt(len(labels) * 4)))
        cells = rng.choice(side * side, size=len(labels), replace=False)
        coords = np.stack([(cells % side) * s, (cells // side) * s], axis=1).astype(np.int64)
        yield PatientPatches(config.patient_id(index), images, labels.copy(), coords)


@dataclass
class SyntheticPatches:
    """All patches in memory; ``patient_ids`` is one string per patch."""

    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    coords: np.ndarray


def generate_patches(config: SyntheticPatchConfig) -> SyntheticPatches:
    """Generate every patch in memory (use :func:`write_synthetic_dataset` for big sets)."""
    parts = list(iter_patients(config))
    return SyntheticPatches(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        patient_ids=np.concatenate([[p.patient_id] * len(p.labels) for p in parts]).astype(str),
        coords=np.concatenate([p.coords for p in parts]),
    )


def idc_filename(patient_id: str, x: int, y: int, label: int) -> str:
    """IDC-style relative path ``PATIENT/C/PATIENT_idx5_xX_yY_classC.png``."""
    return f"{patient_id}/{label}/{patient_id}_idx5_x{x}_y{y}_class{label}.png"


def write_synthetic_dataset(
    out_dir: str | Path,
    config: SyntheticPatchConfig,
    *,
    formats: tuple[str, ...] = ("png",),
    split_seed: int | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> dict[str, Path]:
    """Write patches as IDC-layout PNGs and/or a packed Zarr store, plus ``manifest.csv``.

    Returns the written paths: ``{"manifest": ..., "store": ...}`` (store only with
    ``"zarr"`` in ``formats``). Manifest paths are relative to ``out_dir``; splits are
    patient-level, seeded with ``split_seed`` (default: ``config.seed``).
    """
    import pandas as pd
    from PIL import Image

    from wsi_cmaf.train.data.manifest import assign_patient_splits, write_manifest

    unknown = set(formats) - {"png", "zarr"}
    if unknown or not formats:
        raise ConfigError(f"formats must be a non-empty subset of ('png', 'zarr'), got {formats}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, parts = [], []
    for part in iter_patients(config):
        for img, lab, (x, yy) in zip(part.images, part.labels, part.coords):
            rel = idc_filename(part.patient_id, int(x), int(yy), int(lab))
            rows.append({"path": rel, "label": int(lab), "patient_id": part.patient_id,
                         "x": int(x), "y": int(yy), "source": "synthetic"})
            if "png" in formats:
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(dest, compress_level=1)
        if "zarr" in formats:
            parts.append(part)
    frame = pd.DataFrame(rows)
    by_patient = frame.groupby("patient_id")["label"].max().to_dict()
    splits = assign_patient_splits(by_patient, fractions=fractions,
                                   seed=config.seed if split_seed is None else split_seed)
    frame.insert(3, "split", frame["patient_id"].map(splits))
    written = {"manifest": write_manifest(frame, out / "manifest.csv")}
    if "zarr" in formats:
        from wsi_cmaf.train.data.patchstore import write_patch_store

        written["store"] = write_patch_store(
            out / "patches.zarr",
            np.concatenate([p.images for p in parts]),
            frame["label"].to_numpy(), frame["patient_id"].to_numpy(), frame["split"].to_numpy(),
            attrs={"synthetic_config": config.to_dict()},
        )
    logger.info("wrote %d synthetic patches of %d patients to %s", len(frame), config.n_patients, out)
    return written
