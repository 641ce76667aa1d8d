"""Level-0 µm/px estimated from the image itself: the sizes of nuclei in H&E.

Method: sampled tissue tiles of level 0 are unmixed into haematoxylin with
:func:`skimage.color.rgb2hed`; the haematoxylin image is clipped at its 1st and 99.5th
percentile over tissue (JPEG ringing and ink give rare extreme values) and thresholded with
Otsu over all sampled tissue pixels at once. Connected objects are kept when they look like
nuclei: solid (ellipse fill, a cheap solidity, ≥ :data:`MIN_ELLIPSE_FILL`), not fibre-like (eccentricity ≤
:data:`MAX_ECCENTRICITY`), at least :data:`MIN_AREA_PX` px (below that shape measures are
noise) and not cut by the tile border. The statistic is the *area-weighted* median of the
objects' equivalent diameters in px: single-pixel noise objects are many but hold few pixels,
so the weighting lets the nuclei decide. Then ``µm/px = REFERENCE_DIAMETER_UM / diameter_px``.

Nothing in the pipeline knows the scale, so the same thresholds apply at 0.25 or 2 µm/px:
the estimate scales with the pixels (measured on copies resampled by 2 and 4, see
``benchmarks/README.md``).

Assumptions (say so before trusting it): H&E staining; nuclei present and in focus over most
of the sampled tissue; ordinary nucleated tissue (epithelium, stroma, lymphocytes). Tissue
mostly made of fat, mucin, necrosis or keratin, or a stain other than H&E, has other
"haematoxylin objects" and can be off by more than the interval says.

The reference diameter was calibrated on the one real slide here with a trustworthy µm/px
(``cmu_small_region.svs``, Aperio 0.499) and is consistent with textbook sizes (thresholded
nuclear cores of 5-6 µm equivalent diameter; whole nuclei are 6-10 µm long). The interval
combines the spread of per-tile estimates (bootstrap over tiles) with
:data:`REFERENCE_SPREAD`, the tissue-to-tissue variation of nuclear size that one reference
value cannot know.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.measure import label
from skimage.segmentation import clear_border

from wsi_cmaf.errors import MppEstimateError
from wsi_cmaf.qc.blur import haematoxylin
from wsi_cmaf.qc.ink import ink_mask
from wsi_cmaf.slide.reader import SlideReader
from wsi_cmaf.slide.tissue import TissueMask

logger = logging.getLogger(__name__)

#: µm; area-weighted median equivalent diameter of thresholded nuclei (see the module text)
REFERENCE_DIAMETER_UM = 5.3
#: multiplicative uncertainty of the reference between tissues (±20 %)
REFERENCE_SPREAD = 1.20
MIN_ELLIPSE_FILL = 0.80
MAX_ECCENTRICITY = 0.95
MIN_AREA_PX = 3
#: fewest nucleus-like objects an estimate needs
MIN_NUCLEI = 50
#: below this many nucleus-like objects an estimate is reported as low-confidence
CONFIDENT_NUCLEI = 200
#: metadata and estimate further apart than this factor are reported as disagreeing. The worst
#: error measured on the real slides and their resampled copies is 1.14x (benchmarks/README.md)
#: and the reference may be 1.2x off for another tissue; a 20x/40x mix-up is 2x. 1.6 flags a 2x
#: error even when the estimate errs 25 % towards the metadata, and a correct label only when the
#: estimate errs by 60 %, five times the worst error measured.
DISAGREE_FACTOR = 1.6
#: ``SlideReader.mpp_source`` of a µm/px opened with ``mpp="estimate"``
ESTIMATED_SOURCE = "estimated from nuclei"
#: saturation (0-255) above which a screening pixel counts as stained tissue
_TISSUE_SATURATION = 30
#: a sampled tile must be at least this much tissue
_MIN_TILE_TISSUE = 0.5
#: largest level read whole to find where the tissue is
_SCREEN_MAX_PIXELS = 4_000_000


@dataclass(frozen=True)
class MppEstimate:
    """A level-0 µm/px measured from nuclear sizes, with its interval and the evidence behind it."""

    mpp: float
    interval: tuple[float, float]
    diameter_px: float
    n_nuclei: int
    n_tiles: int
    method: str = "nuclei"

    @property
    def confident(self) -> bool:
        """Whether enough nucleus-like objects were measured (:data:`CONFIDENT_NUCLEI`)."""
        return self.n_nuclei >= CONFIDENT_NUCLEI

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        out = asdict(self)
        out["interval"] = [float(v) for v in self.interval]
        out["confident"] = self.confident
        return out


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _tissue_pixels(rgb: np.ndarray, without_ink: bool = False) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("HSV"))
    tissue = hsv[..., 1] > _TISSUE_SATURATION
    if without_ink:  # ink dots are solid, dark and haematoxylin-positive: they would pass as nuclei
        tissue &= ~ink_mask(hsv[..., 0], hsv[..., 1], hsv[..., 2])
    return tissue


def nucleus_sizes(tiles: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tile, (equivalent diameters in px, areas in px) of the nucleus-like objects.

    One Otsu threshold over all tiles' tissue: a per-tile threshold would split a tile
    without nuclei inside its stroma.
    """
    def unmix(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return haematoxylin(rgb), _tissue_pixels(rgb, without_ink=True)

    # the per-tile filters, labelling and bincounts release the GIL: one thread per core
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8))) as pool:
        hema, tissue = zip(*pool.map(unmix, tiles)) if tiles else ((), ())
        values = np.concatenate([h[t] for h, t in zip(hema, tissue)]) if tiles else np.zeros(0)
        if values.size < 100:
            return []
        lo, hi = np.percentile(values, [1.0, 99.5])
        if not hi > lo:
            return []
        threshold = lo + float(threshold_otsu(np.clip(values, lo, hi) - lo))

        def objects(pair: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            h, t = pair
            area, ellipse_fill, eccentricity = _shape_stats(clear_border(label((h > threshold) & t, connectivity=1)))
            keep = (area >= MIN_AREA_PX) & (ellipse_fill >= MIN_ELLIPSE_FILL) & (eccentricity <= MAX_ECCENTRICITY)
            return np.sqrt(4.0 * area[keep] / math.pi), area[keep]

        return list(pool.map(objects, zip(hema, tissue)))


def _shape_stats(objects: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(area, ellipse fill, eccentricity) of labels 1..n, from second moments by bincount.

    Ellipse fill is the area over the area of the ellipse with the same second moments: 1 for a
    filled ellipse, lower for ragged, hollow or bent shapes (a cheap stand-in for solidity;
    skimage's per-object convex hulls and moments cost seconds on ten thousand objects).
    """
    n = int(objects.max())
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    # sums over the labelled pixels only (a minority of the tile)
    ys, xs = np.nonzero(objects)
    flat = objects[ys, xs]
    ys, xs = ys.astype(np.float64), xs.astype(np.float64)
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    count = np.maximum(area, 1.0)  # labels cleared from the border have no pixels

    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(flat, weights=v, minlength=n + 1)[1:] / count

    my, mx = mean(ys), mean(xs)
    # a pixel is a unit square, not a point: its own variance is 1/12 per axis
    vyy = mean(ys * ys) - my * my + 1.0 / 12.0
    vxx = mean(xs * xs) - mx * mx + 1.0 / 12.0
    vxy = mean(xs * ys) - mx * my
    half_trace, root = (vxx + vyy) / 2.0, np.sqrt(((vxx - vyy) / 2.0) ** 2 + vxy ** 2)
    major, minor = half_trace + root, np.maximum(half_trace - root, 1e-12)
    ellipse_fill = area / (4.0 * math.pi * np.sqrt(major * minor))
    eccentricity = np.sqrt(np.clip(1.0 - minor / major, 0.0, 1.0))
    return area, ellipse_fill, eccentricity


def estimate_from_tiles(tiles: list[np.ndarray], *, seed: int = 0, n_boot: int = 200) -> MppEstimate:
    """Estimate level-0 µm/px from RGB tiles of level 0 (each (H, W, 3) uint8, mostly tissue).

    Raises MppEstimateError when the tiles hold fewer than :data:`MIN_NUCLEI` nucleus-like objects.
    """
    sizes = nucleus_sizes(tiles)
    diam = np.concatenate([d for d, _ in sizes]) if sizes else np.zeros(0)
    area = np.concatenate([a for _, a in sizes]) if sizes else np.zeros(0)
    if diam.size < MIN_NUCLEI:
        raise MppEstimateError(
            f"only {diam.size} nucleus-like objects in {len(tiles)} tissue tiles (need {MIN_NUCLEI}): "
            "the µm/px cannot be estimated from this image (is it H&E, with nucleated tissue?); "
            "pass the scanner's µm/px with --mpp")
    d = _weighted_median(diam, area)
    # bootstrap over tiles: nuclei within a tile are not independent (one tissue type per tile)
    rng = np.random.default_rng(seed)
    boots = []
    per_tile = [(dd, aa) for dd, aa in sizes if dd.size]
    for _ in range(n_boot if len(per_tile) > 1 else 0):
        pick = rng.integers(0, len(per_tile), len(per_tile))
        bd = np.concatenate([per_tile[i][0] for i in pick])
        ba = np.concatenate([per_tile[i][1] for i in pick])
        boots.append(_weighted_median(bd, ba))
    d_lo, d_hi = (np.percentile(boots, [2.5, 97.5]) if boots else (d, d))
    mpp = REFERENCE_DIAMETER_UM / d
    interval = (REFERENCE_DIAMETER_UM / d_hi / REFERENCE_SPREAD, REFERENCE_DIAMETER_UM / d_lo * REFERENCE_SPREAD)
    return MppEstimate(mpp=float(mpp), interval=(float(interval[0]), float(interval[1])), diameter_px=float(d),
                       n_nuclei=int(diam.size), n_tiles=len(tiles))


def _screen_level(reader: SlideReader) -> int:
    for level in range(reader.level_count):
        w, h = reader.level_dimensions[level]
        if w * h <= _SCREEN_MAX_PIXELS:
            return level
    return reader.level_count - 1


def sample_tissue_tiles(reader: SlideReader, n_tiles: int = 48, tile_px: int = 256,
                        seed: int = 0, tissue: TissueMask | None = None) -> list[np.ndarray]:
    """Up to ``n_tiles`` level-0 tiles of ``tile_px`` px that are mostly tissue, spread over the slide.

    Where the tissue is comes from ``tissue`` (a tissue mask of this slide, which needs its µm/px)
    or else from one coarse level read whole (no µm/px needed); candidates are drawn at random
    (``seed``) among the lattice tiles with enough tissue.
    """
    w0, h0 = reader.level_dimensions[0]
    tile_px = min(tile_px, w0, h0)
    screen = None
    if tissue is not None:
        screen = np.asarray(tissue.mask, bool)
        sx, sy = reader.mpp[0] / tissue.mpp, reader.mpp[1] / tissue.mpp
    else:
        level = _screen_level(reader)
        lw, lh = reader.level_dimensions[level]
        if lw * lh <= 4 * _SCREEN_MAX_PIXELS:
            screen = _tissue_pixels(reader.read_region((0, 0), level, (lw, lh)))
        sx, sy = lw / w0, lh / h0
    candidates = []
    for y in range(0, h0 - tile_px + 1, tile_px):
        for x in range(0, w0 - tile_px + 1, tile_px):
            if screen is None:
                candidates.append((x, y))
                continue
            part = screen[int(y * sy):max(int(y * sy) + 1, int((y + tile_px) * sy)),
                          int(x * sx):max(int(x * sx) + 1, int((x + tile_px) * sx))]
            if part.mean() >= _MIN_TILE_TISSUE:
                candidates.append((x, y))
    rng = np.random.default_rng(seed)
    tiles = []
    for i in rng.permutation(len(candidates)):
        x, y = candidates[i]
        rgb = reader.read_region((x, y), 0, (tile_px, tile_px))
        if screen is None and _tissue_pixels(rgb).mean() < _MIN_TILE_TISSUE:
            continue
        tiles.append(rgb)
        if len(tiles) >= n_tiles:
            break
    return tiles


def estimate_mpp(reader: SlideReader, n_tiles: int = 48, tile_px: int = 256, seed: int = 0,
                 tissue: TissueMask | None = None) -> MppEstimate:
    """Estimate ``reader``'s level-0 µm/px from the nuclei in up to ``n_tiles`` sampled tissue tiles.

    Works without any µm/px metadata. ``tissue`` (a tissue mask of the slide, when its µm/px is
    known) saves finding the tissue again. Raises MppEstimateError when the slide has too little
    tissue or too few nucleus-like objects.
    """
    tiles = sample_tissue_tiles(reader, n_tiles=n_tiles, tile_px=tile_px, seed=seed, tissue=tissue)
    if not tiles:
        raise MppEstimateError(f"{reader.path}: no tissue tile of {tile_px} px found to estimate the µm/px from; "
                               "pass the scanner's µm/px with --mpp")
    est = estimate_from_tiles(tiles, seed=seed)
    logger.info("%s: µm/px estimated from %d nuclei in %d tiles: %.3g (%.3g-%.3g)", reader.path.name,
                est.n_nuclei, est.n_tiles, est.mpp, *est.interval)
    return est


def mpp_disagreement(metadata_mpp: tuple[float, float], estimate: MppEstimate) -> str | None:
    """A warning when the metadata µm/px and the estimate differ by more than :data:`DISAGREE_FACTOR`; else None."""
    meta = (float(metadata_mpp[0]) * float(metadata_mpp[1])) ** 0.5
    factor = max(meta / estimate.mpp, estimate.mpp / meta)
    if factor <= DISAGREE_FACTOR:
        return None
    return (f"the slide's µm/px metadata ({meta:.3g}) and the µm/px estimated from its nuclei "
            f"({estimate.mpp:.3g}, interval {estimate.interval[0]:.3g}-{estimate.interval[1]:.3g}) differ "
            f"by {factor:.2f}x (more than {DISAGREE_FACTOR}x): check the scanner's value; a wrong one sizes "
            f"every tile wrongly (pass --mpp VALUE, or --mpp-check off to silence this)")
