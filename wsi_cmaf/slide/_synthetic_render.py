"""Procedural H&E-like texture used by :mod:`wsi_cmaf.slide.synthetic` (private).

Everything is a pure function of the seed and of *level-0 coordinates*, so any tile of any
level can be rendered on its own, in any order, without holding a level in memory:

* **Fields** (tissue, tumour, fibre orientation) are signed level sets on a coarse grid
  (one node every ``FIELD_SPACING`` level-0 px) and bilinearly sampled at pixel centres.
  Tissue is where the tissue field is > 0; tumour where both fields are > 0.
* **Nuclei** come from a bank of precomputed ``CELL``-px patches (benign: sparse, small,
  elongated; tumour: dense, large, irregular, dark). The level-0 plane is cut into cells;
  each cell takes one patch and one of 8 flips/transposes chosen by a hash of
  ``(seed, cell row, cell col)``. Nuclei never cross a patch border, so there are no seams.
* **Stroma** fibres are two periodic FFT-filtered noise textures with different periods and
  orientations, blended by a low-frequency field (the combined period is 3072 px).

Reduced levels use the same fields and block-averaged copies of the banks (exact block means,
because every downsample divides the patch size), then the same Beer-Lambert colour model.
A reduced-level tile is therefore the downsampled level-0 image up to the non-linearity of
the colour model (tested: mean absolute difference of a few grey levels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FIELD_SPACING = 64  # level-0 px between field nodes
CELL = 256  # level-0 px of one nucleus patch; downsamples must divide it (or exceed it)
N_PATCHES = 32
_QUANT = 100.0  # banks hold haematoxylin concentration as uint8 in steps of 0.01
STROMA_PERIODS = (1024, 768)
BACKGROUND = np.array([243.0, 242.0, 246.0], dtype=np.float32)
# Ruifrok & Johnston optical-density vectors for haematoxylin and eosin (unit length).
_H_OD = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_E_OD = np.array([0.072, 0.990, 0.105], dtype=np.float32)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def hash_u64(seed: int, a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """SplitMix64-style hash of integer arrays; deterministic across platforms."""
    with np.errstate(over="ignore"):
        x = (np.asarray(a, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            np.asarray(b, dtype=np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        x = x ^ np.uint64((seed * 0x165667B19E3779F9 + salt * 0x27D4EB2F165667C5) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x & _MASK64


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(sigma, 0.5))
    return noise / max(float(noise.std()), 1e-6)


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, a: float, b: float, angle: float):
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / a
    v = (-(xx - cx) * s + (yy - cy) * c) / b
    return 1.0 - (u * u + v * v)


@dataclass
class Fields:
    """Coarse signed fields; node (i, j) sits at level-0 px ((j + .5) S, (i + .5) S)."""

    tissue: np.ndarray
    tumour: np.ndarray
    orient: np.ndarray
    edge_gain: float  # field units per level-0 px near tissue edges (for anti-aliasing)


def make_fields(width: int, height: int, seed: int, tumour: bool, blank: bool) -> Fields:
    """Tissue as a few irregular blobs, tumour as smaller blobs inside tissue."""
    rng = np.random.default_rng([seed, 0xF1E1D])
    gh, gw = -(-height // FIELD_SPACING) + 1, -(-width // FIELD_SPACING) + 1
    yy, xx = np.meshgrid(
        (np.arange(gh, dtype=np.float32) + 0.5) * FIELD_SPACING,
        (np.arange(gw, dtype=np.float32) + 0.5) * FIELD_SPACING,
        indexing="ij",
    )
    short = float(min(width, height))
    node_scale = short / FIELD_SPACING  # short side in field nodes
    orient = _smooth_noise(rng, (gh, gw), 0.15 * node_scale)
    orient = 1.0 / (1.0 + np.exp(-2.0 * orient))
    if blank:
        neg = np.full((gh, gw), -1e6, dtype=np.float32)  # far below any edge band: never tissue
        return Fields(neg, neg.copy(), orient, 1e-6)
    tissue = np.full((gh, gw), -np.inf, dtype=np.float32)
    radii = []
    for _ in range(int(rng.integers(2, 5))):
        a = rng.uniform(0.18, 0.3) * short
        b = a * rng.uniform(0.55, 1.0)
        radii.append(b)
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.2, 0.8) * width
        tissue = np.maximum(tissue, _blob(yy, xx, cy, cx, a, b, rng.uniform(0, np.pi)))
    tissue += 0.35 * _smooth_noise(rng, (gh, gw), 0.05 * node_scale)
    tissue += 0.12 * _smooth_noise(rng, (gh, gw), 0.012 * node_scale)
    border = np.minimum(np.minimum(xx, width - xx), np.minimum(yy, height - yy))
    tissue = np.minimum(tissue, border / (0.04 * short) - 1.0)
    tum = np.full((gh, gw), -1.0, dtype=np.float32)
    inside = np.argwhere(tissue > 0.35)
    if tumour and len(inside):
        tum[:] = -np.inf
        for _ in range(int(rng.integers(1, 4))):
            iy, ix = inside[rng.integers(len(inside))]
            a = rng.uniform(0.07, 0.13) * short
            tum = np.maximum(tum, _blob(yy, xx, yy[iy, ix], xx[iy, ix], a, a * rng.uniform(0.6, 1),
                                        rng.uniform(0, np.pi)))
        tum += 0.3 * _smooth_noise(rng, (gh, gw), 0.02 * node_scale)
    edge_gain = 2.0 / float(min(radii))  # d(1 - r^2)/dr at r = 1, per level-0 px
    return Fields(tissue.astype(np.float32), tum.astype(np.float32), orient.astype(np.float32), edge_gain)


def _axis_weights(start: int, n: int, step: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear indices/weights of pixel centres ``(start + k + .5) * step`` on a field axis."""
    f = (start + np.arange(n, dtype=np.float64) + 0.5) * step / FIELD_SPACING - 0.5
    i0 = np.clip(np.floor(f).astype(np.int64), 0, size - 2)
    return i0, np.clip(f - i0, 0.0, 1.0).astype(np.float32)


def sample_field(field: np.ndarray, y0: int, x0: int, h: int, w: int, step: float) -> np.ndarray:
    """Bilinear sample of ``field`` at the centres of an (h, w) pixel block of pixel size ``step``."""
    ri, rw = _axis_weights(y0, h, step, field.shape[0])
    ci, cw = _axis_weights(x0, w, step, field.shape[1])
    c0, c1 = int(ci.min()), int(ci.max()) + 2
    sub = field[:, c0:c1]
    rows = sub[ri] * (1 - rw)[:, None] + sub[ri + 1] * rw[:, None]
    ci = ci - c0
    return rows[:, ci] * (1 - cw) + rows[:, ci + 1] * cw


def _nucleus_patch(rng: np.random.Generator, mpp: float, tumour: bool) -> np.ndarray:
    """One CELL x CELL haematoxylin-concentration patch (float32)."""
    conc = np.zeros((CELL, CELL), dtype=np.float32)
    area_um2 = (CELL * mpp) ** 2
    if tumour:
        n = int(np.clip(rng.poisson(0.0055 * area_um2), 4, 400))
        r_um, aspect, irregular, dark = (3.2, 5.5), (1.0, 1.6), 0.15, (1.2, 1.9)
    else:
        n = int(np.clip(rng.poisson(0.0025 * area_um2), 1, 200))
        r_um, aspect, irregular, dark = (2.2, 3.6), (1.4, 3.0), 0.05, (0.9, 1.3)
    grain = ndimage.gaussian_filter(rng.standard_normal((CELL, CELL)).astype(np.float32), 1.0)
    grain /= max(float(grain.std()), 1e-6)
    for _ in range(n):
        r = rng.uniform(*r_um) / mpp
        asp = rng.uniform(*aspect)
        ra, rb = r * np.sqrt(asp), r / np.sqrt(asp)
        margin = int(np.ceil(ra * (1 + 2 * irregular))) + 2
        if 2 * margin >= CELL:
            continue  # nucleus larger than a cell at this mpp: skip rather than cross a seam
        cy, cx = rng.uniform(margin, CELL - margin, size=2)
        y0, y1, x0, x1 = int(cy) - margin, int(cy) + margin + 1, int(cx) - margin, int(cx) + margin + 1
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = dy - cy, dx - cx
        ang = rng.uniform(0, np.pi)
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang)
        theta = np.arctan2(v, u)
        wobble = 1 + irregular * (np.cos(2 * theta + rng.uniform(0, 6.3)) + np.cos(3 * theta + rng.uniform(0, 6.3)))
        rho = np.sqrt((u / ra) ** 2 + (v / rb) ** 2)
        inside = np.clip((wobble - rho) * r + 0.5, 0.0, 1.0)  # ~1 px soft edge
        value = inside * rng.uniform(*dark) * (1 + 0.18 * grain[y0:y1, x0:x1])
        conc[y0:y1, x0:x1] = np.maximum(conc[y0:y1, x0:x1], value)
    return conc


def _periodic_fibres(rng: np.random.Generator, period: int, angle: float, mpp: float) -> np.ndarray:
    """Periodic anisotropic noise in [0, 1] (fibre-like stroma), via FFT filtering."""
    fy = np.fft.fftfreq(period)[:, None] / mpp  # cycles per µm
    fx = np.fft.fftfreq(period)[None, :] / mpp
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    # long along the fibre (~40 µm), thin across it (~3 µm)
    gain = np.exp(-((along * 40.0) ** 2) - (across * 3.0) ** 2)
    spec = np.fft.fft2(rng.standard_normal((period, period))) * gain
    tex = np.real(np.fft.ifft2(spec)).astype(np.float32)
    tex = (tex - tex.mean()) / max(float(tex.std()), 1e-6)
    return 1.0 / (1.0 + np.exp(-1.5 * tex))


def _block_mean(a: np.ndarray, d: int) -> np.ndarray:
    *lead, h, w = a.shape
    return a.reshape(*lead, h // d, d, w // d, d).mean(axis=(-3, -1))


@dataclass
class Bank:
    """Texture banks at one downsample ``d``; ``None`` means 'use the constant mean'."""

    d: int
    cell: int  # patch side at this level (CELL // d), 0 when d > CELL
    benign: np.ndarray  # uint8 (N*8*cell*cell,) flattened, 8 dihedral variants per patch
    tumour: np.ndarray
    benign_mean: float
    tumour_mean: float
    fibres: tuple[tuple[int, np.ndarray] | float, ...]  # (period, texture wrapped by one tile)


def _dihedral(p: np.ndarray) -> np.ndarray:
    variants = [p, p[::-1], p[:, ::-1], p[::-1, ::-1]]
    variants += [v.T for v in variants]
    return np.stack(variants)


@functools.lru_cache(maxsize=4)
def level0_textures(seed: int, mpp: float) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Level-0 nucleus patches (benign, tumour) and periodic fibre textures for a seed and µm/px."""
    rng = np.random.default_rng([seed, 0xBA4C])
    benign = np.stack([_nucleus_patch(rng, mpp, False) for _ in range(N_PATCHES)])
    tumour = np.stack([_nucleus_patch(rng, mpp, True) for _ in range(N_PATCHES)])
    angles = rng.uniform(0, np.pi, size=2)
    fibres = tuple(_periodic_fibres(rng, p, a, mpp) for p, a in zip(STROMA_PERIODS, angles))
    return benign, tumour, fibres


@functools.lru_cache(maxsize=16)
def bank_for(seed: int, mpp: float, d: int, tile: int) -> Bank:
    """Banks at downsample ``d`` (exact block means of the level-0 banks) for ``tile``-px windows."""
    benign0, tumour0, fibres0 = level0_textures(seed, mpp)
    if d > CELL:
        cell, benign, tumour = 0, np.zeros(0), np.zeros(0)
    else:
        cell = CELL // d
        benign = _dihedral_stack(_quantise(_block_mean(benign0, d)))
        tumour = _dihedral_stack(_quantise(_block_mean(tumour0, d)))
    fibres: list[tuple[int, np.ndarray] | float] = []
    for f in fibres0:
        if d > f.shape[0]:
            fibres.append(float(f.mean()))
        else:
            small = _block_mean(f, d)
            # Wrapped by one tile so any tile window is a plain slice (no modulo gather).
            fibres.append((small.shape[0], np.pad(small, (0, tile), mode="wrap")))
    return Bank(d, cell, benign, tumour, float(benign0.mean()), float(tumour0.mean()), tuple(fibres))


def _quantise(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * _QUANT), 0, 255).astype(np.uint8)


def _dihedral_stack(patches: np.ndarray) -> np.ndarray:
    # Flattened (N*8, c, c): index = patch * 8 + variant. uint8 in, so no large float temporaries.
    return np.concatenate([_dihedral(p) for p in patches]).ravel()


def _nuclei(bank: Bank, flat: np.ndarray, mean: float, seed: int, y0: int, x0: int, n: int, salt: int) -> np.ndarray:
    """Haematoxylin concentration of nuclei for an n x n pixel window at (y0, x0) of the level."""
    if bank.cell == 0:
        return np.full((n, n), mean, dtype=np.float32)
    c = bank.cell
    ys, xs = np.arange(y0, y0 + n), np.arange(x0, x0 + n)
    cy, cx = ys // c, xs // c
    cy_u, cy_i = np.unique(cy, return_inverse=True)
    cx_u, cx_i = np.unique(cx, return_inverse=True)
    h = hash_u64(seed, cy_u[:, None], cx_u[None, :], salt)
    choice = (h % np.uint64(N_PATCHES * 8)).astype(np.int64)  # patch*8 + variant
    base = choice[cy_i][:, cx_i] * (c * c)
    base += ((ys % c) * c)[:, None] + (xs % c)[None, :]
    return flat[base].astype(np.float32) * np.float32(1.0 / _QUANT)


def render_tile(fields: Fields, seed: int, mpp: float, d: int, y0: int, x0: int, n: int,
                noise: np.ndarray) -> np.ndarray | None:
    """RGB uint8 (n, n, 3) of the level with downsample ``d`` at level pixel (y0, x0).

    Returns ``None`` when the window holds no tissue at all (the caller reuses a background tile).
    """
    tissue_v = sample_field(fields.tissue, y0, x0, n, n, d)
    band = max(1.5 * d * fields.edge_gain, 1e-6)
    rough = 8.0 * fields.edge_gain  # fibres roughen the edge by up to ~8 level-0 px
    if float(tissue_v.max()) < -(band + rough):
        return None
    bank = bank_for(seed, mpp, d, n)
    weight = sample_field(fields.orient, y0, x0, n, n, d)
    fib = []
    for f in bank.fibres:
        if isinstance(f, float):
            fib.append(np.full((n, n), f, dtype=np.float32))
        else:
            p, ext = f
            fib.append(ext[y0 % p:y0 % p + n, x0 % p:x0 % p + n])
    fibre = fib[1] + (fib[0] - fib[1]) * weight
    alpha = np.clip(0.5 + (tissue_v + rough * (2 * fibre - 1)) / band, 0.0, 1.0)
    if not alpha.any():
        return None
    tum = sample_field(fields.tumour, y0, x0, n, n, d) > 0
    hem = _nuclei(bank, bank.benign, bank.benign_mean, seed, y0, x0, n, 1)
    eosin = 0.12 + 0.4 * fibre
    if tum.any():
        hem_t = _nuclei(bank, bank.tumour, bank.tumour_mean, seed, y0, x0, n, 2)
        hem = np.where(tum, hem_t + 0.1, hem)
        eosin *= np.where(tum, np.float32(0.85), np.float32(1.0))
    eosin *= 1 - 0.5 * np.minimum(hem, 1.0)
    hem += 0.04
    hem *= alpha
    eosin *= alpha
    out = np.empty((n, n, 3), dtype=np.uint8)
    buf = np.empty((n, n), dtype=np.float32)
    for c in range(3):  # per channel with in-place ops: ~2x faster than broadcasting (n, n, 3)
        np.multiply(hem, -_H_OD[c], out=buf)
        buf -= eosin * _E_OD[c]
        np.exp(buf, out=buf)
        buf *= BACKGROUND[c]
        buf += noise
        np.clip(buf, 0, 255, out=buf)
        out[..., c] = buf
    return out
