"""Tissue detection on a low-resolution thumbnail (≈ 8 µm/px).

Method: the slide is rendered at ``TissueConfig.mpp`` with :meth:`SlideReader.thumbnail`
and converted to HSV. Stained tissue is coloured, glass is white or grey, so a pixel is
tissue when its saturation exceeds a threshold ``t = clip(otsu(S), min_saturation,
max_threshold)``: Otsu adapts to the stain intensity of the slide, the floor
(``min_saturation``) makes a blank or near-white slide give an *empty* mask instead of
Otsu splitting noise, and the ceiling (``max_threshold``) stops Otsu from splitting
*inside* the tissue on slides that are mostly tissue (it would drop pale stroma).
Very dark pixels (value < ``min_value``) are never tissue. Morphology (scikit-image):
closing with a disk, then holes smaller than ``fill_holes_um2`` are filled and objects
smaller than ``min_object_um2`` are removed; both areas are in µm² so the result does
not depend on the thumbnail resolution.

Known limits (say so before trusting the mask):

- **Pen and ink.** Green/cyan marker (hue within ``pen_hue_range``, default
  0.20-0.55) is removed, also after morphology, because H&E never has that hue.
  With ``exclude_ink`` (default) blue, black and red marker are removed too, by the
  hue/saturation/value rules of :mod:`wsi_cmaf.qc.ink`, and the ink found is kept in
  ``TissueMask.ink`` (its area is reported; tiles that are mostly ink are not analysed).
  On the DICOM test slide at 8 µm/px none of the green ink and none of the dark-blue ink
  dots stay in the mask. Thin black strokes narrower than 3 px of the mask (24 µm) are
  not ink to the rules and can survive as slivers (mostly removed by ``min_object_um2``).
- **Bubbles and folds.** Air-bubble edges are grey (low saturation) and not detected;
  tissue under a bubble stays tissue. Folds are detected (they are more saturated).
- **Pale tissue.** Fat and very pale, unstained or faded tissue has saturation near
  the glass and can be missed; lower ``min_saturation`` for such stains.
- **Black/empty areas.** Missing scanner tiles rendered black are excluded by
  ``min_value``; debris and dust with colour are only removed when small.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_holes, remove_small_objects

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.qc.ink import ink_mask
from wsi_cmaf.slide.faults import TileFailure
from wsi_cmaf.slide.reader import SlideReader

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueConfig:
    """Parameters of :func:`detect_tissue` (areas in µm², saturation/value in [0, 1])."""

    mpp: float = 8.0
    min_saturation: float = 0.05
    max_threshold: float = 0.15
    min_value: float = 0.12
    pen_hue_range: tuple[float, float] | None = (0.20, 0.55)
    closing_radius_um: float = 16.0
    min_object_um2: float = 5_000.0
    fill_holes_um2: float = 20_000.0
    #: remove blue, black and red marker ink as well (see :mod:`wsi_cmaf.qc.ink`)
    exclude_ink: bool = True

    def __post_init__(self) -> None:
        if not self.mpp > 0:
            raise ConfigError(f"TissueConfig.mpp must be > 0, got {self.mpp}")
        if not 0 <= self.min_saturation <= self.max_threshold <= 1:
            raise ConfigError("TissueConfig needs 0 <= min_saturation <= max_threshold <= 1")
        if self.min_object_um2 < 0 or self.fill_holes_um2 < 0 or self.closing_radius_um < 0:
            raise ConfigError("TissueConfig areas and radius must be >= 0")


@dataclass
class TissueMask:
    """Boolean tissue mask over the whole slide; one pixel covers ``mpp`` µm (isotropic).

    ``failed_tiles``: slide tiles that could not be decoded for the thumbnail the mask was made
    from (they count as background here; level-0 locations, see :class:`TileFailure`).
    """

    mask: np.ndarray
    mpp: float
    threshold: float = float("nan")
    failed_tiles: tuple[TileFailure, ...] = field(default=())
    #: marker ink found at the mask's resolution (excluded from ``mask``); None when not looked for
    ink: np.ndarray | None = None

    def ink_fraction(self) -> float:
        """Ink area over ink + tissue area (0 when no ink was looked for or found)."""
        if self.ink is None:
            return 0.0
        n_ink = int(np.count_nonzero(self.ink))
        total = n_ink + int(np.count_nonzero(self.mask))
        return n_ink / total if total else 0.0

    @property
    def n_failed_tiles(self) -> int:
        """Number of undecodable slide tiles painted as background before detection."""
        return len(self.failed_tiles)

    def fraction(self) -> float:
        """Fraction of the slide area covered by tissue, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0


#: thumbnails up to this many pixels are processed in one piece (dask's overhead outweighs a
#: second core below ~1 Mpx)
_PARALLEL_MIN_PIXELS = 1_000_000


def _row_chunks(n_rows: int, n_pixels: int) -> int | None:
    """Rows per dask chunk for an image of ``n_pixels``, or None to stay in one piece."""
    workers = dask.config.get("num_workers", None) or (os.cpu_count() or 1)
    if n_pixels < _PARALLEL_MIN_PIXELS or workers < 2:
        return None
    return max(64, -(-n_rows // workers))


def _hsv(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).convert("HSV"))


def _closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    # Same result as skimage.morphology.closing on a boolean image (outside counts as
    # background for the dilation and as foreground for the erosion); scipy's binary
    # morphology releases the GIL, so row chunks run on several cores.
    return ndi.binary_erosion(ndi.binary_dilation(mask, footprint), footprint, border_value=1)


def _closing_in_rows(mask: np.ndarray, footprint: np.ndarray, rows: int) -> np.ndarray:
    """:func:`_closing` over row chunks of ``rows`` on dask's threads; exact, since a closing
    looks at most 2 * radius away and that is the halo each chunk gets."""
    radius = footprint.shape[0] // 2
    return da.from_array(mask, chunks=(rows, -1)).map_overlap(
        _closing, depth={0: 2 * radius, 1: 0}, boundary="none", footprint=footprint, dtype=bool,
    ).compute(scheduler="threads")


def _steps_at_least(fraction: float) -> int:
    """Smallest uint8 step s with s / 255 >= ``fraction``."""
    return int(np.ceil(fraction * 255.0 - 1e-9))


def tissue_mask_from_rgb(rgb: np.ndarray, mpp: float, config: TissueConfig | None = None) -> TissueMask:
    """Tissue mask of an RGB uint8 image whose pixels are ``mpp`` µm wide.

    When ``rgb`` is a :class:`~wsi_cmaf.slide.faults.Thumbnail` (what ``SlideReader.thumbnail``
    returns), its ``failed_tiles`` are carried over to the mask.
    """
    cfg = config or TissueConfig()
    failed = tuple(getattr(rgb, "failed_tiles", ()))
    rgb = np.asarray(rgb)  # a plain array from here on (dask's chunking needs no subclass)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    # Pillow's C conversion, not skimage.color.rgb2hsv: the same definitions (S = (max-min)/max,
    # V = max) in 1/255 steps, ~15x faster on a slide thumbnail (18 ms vs 270 ms for 1250^2 px).
    # Everything below stays in those uint8 steps (thresholds of 0.05-0.15 need no finer ones);
    # a float copy of a large thumbnail alone costs ~0.1 s.
    rows = _row_chunks(rgb.shape[0], rgb.shape[0] * rgb.shape[1])
    if rows is None:
        hsv = _hsv(rgb)
    else:  # Pillow releases the GIL: row chunks convert in parallel on dask's threads
        hsv = da.from_array(rgb, chunks=(rows, -1, -1)).map_blocks(_hsv, dtype=np.uint8).compute(
            scheduler="threads")
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    usable = val >= _steps_at_least(cfg.min_value)
    if cfg.pen_hue_range is not None:
        lo, hi = cfg.pen_hue_range
        usable &= ~((hue >= _steps_at_least(lo)) & (hue <= int(np.floor(hi * 255.0)))
                    & (sat >= _steps_at_least(cfg.min_saturation)))
    ink = None
    if cfg.exclude_ink:
        ink = ink_mask(hue, sat, val, cfg.min_value)
        usable &= ~ink
    counts = np.bincount(sat[usable], minlength=256)
    levels = np.flatnonzero(counts)
    if levels.size > 1:
        otsu = float(threshold_otsu(hist=(counts[levels[0]:levels[-1] + 1],
                                          np.arange(levels[0], levels[-1] + 1)))) / 255.0
    else:
        otsu = cfg.max_threshold
    threshold = min(max(otsu, cfg.min_saturation), cfg.max_threshold)
    mask = usable & (sat > int(np.floor(threshold * 255.0 + 1e-9)))

    px_area = mpp * mpp
    radius = int(round(cfg.closing_radius_um / mpp))
    if radius >= 1 and mask.any():
        footprint = disk(radius)
        mask = _closing(mask, footprint) if rows is None else _closing_in_rows(mask, footprint, rows)
    # skimage >= 0.26: max_size removes objects/holes of size <= max_size (pixels).
    holes = int(cfg.fill_holes_um2 / px_area)
    if holes >= 1:
        mask = remove_small_holes(mask, max_size=holes)
    # Closing and hole filling would paint ink lines and black areas that lie between
    # tissue back in; they are not analysable tissue, so cut them out again.
    mask &= usable
    small = int(cfg.min_object_um2 / px_area)
    if small >= 1:
        mask = remove_small_objects(mask, max_size=small)
    logger.debug("tissue: otsu=%.3f threshold=%.3f fraction=%.3f", otsu, threshold, mask.mean())
    return TissueMask(mask=mask.astype(bool, copy=False), mpp=float(mpp), threshold=threshold, failed_tiles=failed,
                      ink=ink)


def detect_tissue(reader: SlideReader, config: TissueConfig | None = None) -> TissueMask:
    """Tissue mask of the whole slide at ``config.mpp`` µm/px (needs the slide's µm/px).

    The mask has the shape of ``reader.thumbnail(config.mpp)``: pixel (i, j) covers
    level-0 pixels ``[j * mpp / mpp_x, (j + 1) * mpp / mpp_x)`` horizontally (same for y).
    """
    cfg = config or TissueConfig()
    thumb = reader.thumbnail(cfg.mpp)
    return tissue_mask_from_rgb(thumb, cfg.mpp, cfg)


# -- tile fractions (used by the tile grid) --------------------------------------------------
def tissue_fractions(mask: np.ndarray, mask_mpp: tuple[float, float], target_mpp: float,
                     tile_size: int, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """Exact area fraction of each tile covered by ``mask`` (float32, ``shape``).

    The mask is piecewise constant, so its integral over a rectangle with fractional
    corners is the bilinear interpolation of its summed-area table at those corners.
    ``mask_mpp`` is the (x, y) size of a mask pixel in µm; the mask is anchored at (0, 0).
    """
    n_rows, n_cols = shape
    if n_rows == 0 or n_cols == 0:
        return np.zeros(shape, dtype=np.float32)

    def edges(n: int, px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start = np.arange(n) * stride * target_mpp / px
        pos = np.concatenate([start, start + tile_size * target_mpp / px])
        return pos, np.arange(n), np.arange(n) + n

    def interp_weights(pos: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.clip(pos, 0.0, size)
        i0 = np.minimum(np.floor(pos).astype(np.int64), max(size - 1, 0))
        return i0, pos - i0

    ys, top, bottom = edges(n_rows, mask_mpp[1])
    xs, left, right = edges(n_cols, mask_mpp[0])
    yi, yw = interp_weights(ys, mask.shape[0])
    xi, xw = interp_weights(xs, mask.shape[1])
    # Summed-area table rows only where tile edges need them (a few hundred of thousands of mask
    # rows on a large slide): prefix sums of the mask rows up to each needed row, by reduceat.
    need = np.unique(np.concatenate([yi, yi + 1]))
    table = np.zeros((need.size, mask.shape[1] + 1), dtype=np.float64)
    inner = need[need > 0]
    if inner.size:
        starts = np.concatenate([[0], inner[:-1]])
        prefix = np.cumsum(np.add.reduceat(mask[:inner[-1]], starts, axis=0, dtype=np.int64), axis=0)
        table[need > 0, 1:] = np.cumsum(prefix, axis=1)
    where = np.searchsorted(need, yi)
    rows = table[where] * (1 - yw)[:, None] + table[np.searchsorted(need, yi + 1)] * yw[:, None]
    corner = rows[:, xi] * (1 - xw) + rows[:, xi + 1] * xw  # F at every (y edge, x edge)
    area = (corner[np.ix_(bottom, right)] - corner[np.ix_(top, right)]
            - corner[np.ix_(bottom, left)] + corner[np.ix_(top, left)])
    tile_area = (tile_size * target_mpp / mask_mpp[0]) * (tile_size * target_mpp / mask_mpp[1])
    return np.clip(area / tile_area, 0.0, 1.0).astype(np.float32)


def inside_fractions(n: int, extent: float, tile_size: int, stride: int) -> np.ndarray:
    """Share (float64, (n,)) of each of ``n`` tiles along one axis that lies inside ``extent`` target px."""
    share = np.clip((extent - np.arange(n) * stride) / tile_size, 0.0, 1.0)
    return np.where(share > 1.0 - 1e-6, 1.0, share)  # whole tiles exactly 1 despite float round-off
