"""Out-of-focus tiles: how much of a tile's haematoxylin detail survives at the finest scale.

Sharpness of a tile is the band ratio ``E[(h - G1 h)^2] / E[(G1 h - G2 h)^2]`` of its
haematoxylin image ``h`` (:func:`skimage.color.rgb2hed`), ``Gs`` a Gaussian of σ = s px: the
energy of detail finer than 1 px over that of detail between 1 and 2 px. Dividing by the coarser
band normalises for tissue content (a pale stroma tile and a dense tumour tile have very different
contrast but the same ratio when both are in focus); a defocus blur of σ ≥ 1 px empties the fine
band first, so the ratio drops by an order of magnitude.

It is measured on a window of :data:`WINDOW_PX` px at the centre of each tissue tile, at about
:data:`TARGET_MPP` µm/px (level 0 box-reduced when the slide is finer), so the threshold means
the same on 20x and 40x scans. Focus changes over hundreds of µm, so one window speaks for its tile.

:data:`BLUR_THRESHOLD` was calibrated on the real slides (``benchmarks/bench_qc_blur.py``, table in
``benchmarks/README.md``): on 64 µm tissue tiles of the CMU, TCGA and DICOM slides the 5th
percentiles are 1.89, 0.80 and 1.88 (one TCGA tile of 1,964 reaches 0.44), while the CMU pixels
blurred with σ = 2 px measure 0.23-0.26 and with σ = 3 px 0.18-0.22.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb

from wsi_cmaf.slide.grid import TileGrid
from wsi_cmaf.slide.reader import SlideReader

logger = logging.getLogger(__name__)

#: tiles whose band ratio is below this are flagged as out of focus
BLUR_THRESHOLD = 0.45
#: µm/px the ratio is measured at (or level 0 when that is coarser)
TARGET_MPP = 0.5
#: side of the measured window in px at that resolution
WINDOW_PX = 64
#: lattice spacing of the focus windows inside an analysis (see :func:`tile_sharpness`)
FOCUS_SPACING_UM = 400.0
#: least share of stained pixels a window needs to be judged
MIN_WINDOW_TISSUE = 0.3
_H_FROM_OD = np.ascontiguousarray(hed_from_rgb[:, 0], dtype=np.float32)
# optical density of each 8-bit value, as skimage.color.rgb2hed computes it (-log(v/255) over
# -log(1e-6), v/255 floored at 1e-6): a 256-entry table instead of a logarithm per pixel
_OD_LUT = (np.log(np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)) / np.log(1e-6)).astype(np.float32)


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin channel (float32, H x W) of a uint8 RGB image: ``skimage.color.rgb2hed(rgb)[..., 0]``
    to float32 rounding, without computing the other two channels."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    h = _OD_LUT[rgb[..., 0]] * _H_FROM_OD[0]
    h += _OD_LUT[rgb[..., 1]] * _H_FROM_OD[1]
    h += _OD_LUT[rgb[..., 2]] * _H_FROM_OD[2]
    return np.maximum(h, np.float32(0.0), out=h)


def band_ratio(rgb: np.ndarray) -> float:
    """Sharpness of an (H, W, 3) uint8 RGB window (see the module text); NaN with too little tissue."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    top, bottom = rgb.max(axis=2), rgb.min(axis=2)
    # HSV saturation (max - min) / max > 30/255, as the tissue stage counts stained pixels
    stained = (top.astype(np.int16) - bottom) * 255 > 30 * top.astype(np.int16).clip(1)
    if stained.mean() < MIN_WINDOW_TISSUE or min(rgb.shape[:2]) < 16:
        return float("nan")
    h = haematoxylin(rgb)
    g1 = ndi.gaussian_filter(h, 1.0)
    g2 = ndi.gaussian_filter(h, 2.0)
    fine, medium = float(((h - g1) ** 2).mean()), float(((g1 - g2) ** 2).mean())
    return fine / medium if medium > 0 else float("nan")


def tile_sharpness(reader: SlideReader, grid: TileGrid, tiles: np.ndarray | None = None, *,
                   spacing_um: float | None = None) -> np.ndarray:
    """Band ratio (float32, grid shape) of each tile in ``tiles`` (default: the grid's tissue tiles); NaN elsewhere.

    ``spacing_um`` (e.g. :data:`FOCUS_SPACING_UM`): measure a lattice of tiles about that far apart,
    then grow outwards from every lattice tile that is out of focus or could not be judged, ring by
    ring, until each such region is bordered by in-focus tiles. Defocus spans regions (a scanner's
    focus points lie millimetres apart; folds and bubbles are rarely smaller than a few hundred µm),
    so the lattice finds them and the growth delineates them tile by tile, at a fraction of the
    decodes. Tiles left unmeasured keep NaN (not judged); a blurred patch smaller than the spacing
    that falls between lattice tiles can be missed. None measures every tile.
    """
    tiles = np.asarray(grid.tissue if tiles is None else tiles, bool)
    out = np.full(grid.shape, np.nan, dtype=np.float32)
    measure = _window_measure(reader, grid)
    # decoding and the filters release the GIL: one thread per core
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8))) as pool:
        def run(todo: np.ndarray) -> None:
            where = [(int(r), int(c)) for r, c in zip(*np.nonzero(todo))]
            for (r, c), value in zip(where, pool.map(measure, where, chunksize=16)):
                out[r, c] = value

        if spacing_um is None:
            run(tiles)
            return out
        stride = max(1, int(spacing_um // (grid.config.tile_size * grid.config.mpp)))
        rows, cols = np.indices(grid.shape)
        todo = tiles & (rows % stride == stride // 2) & (cols % stride == stride // 2)
        measured = np.zeros(grid.shape, bool)
        while todo.any():
            run(todo)
            measured |= todo
            with np.errstate(invalid="ignore"):
                seeds = measured & ~(out >= BLUR_THRESHOLD)  # blurred or not judged
            todo = ndi.binary_dilation(seeds, structure=np.ones((3, 3), bool)) & tiles & ~measured
    return out


def _window_measure(reader: SlideReader, grid: TileGrid):
    """The band ratio of one tile's focus window, as a function of (row, col)."""
    mx, my = reader.mpp
    factor = max(1, int(round(TARGET_MPP / min(mx, my))))
    tile_w = grid.config.tile_size * grid.config.mpp / mx
    tile_h = grid.config.tile_size * grid.config.mpp / my
    side = int(min(WINDOW_PX * factor, tile_w, tile_h))
    w0, h0 = reader.level_dimensions[0]
    stored_w, stored_h = (_stored_tile(reader, "width"), _stored_tile(reader, "height"))

    def measure(rc: tuple[int, int]) -> float:
        x, y = grid.tile_location(*rc)
        cx, cy = x + tile_w / 2.0, y + tile_h / 2.0
        x0 = _inside_one_tile(min(max(cx - side / 2.0, 0), max(w0 - side, 0)), cx, side, stored_w)
        y0 = _inside_one_tile(min(max(cy - side / 2.0, 0), max(h0 - side, 0)), cy, side, stored_h)
        rgb = reader.read_region((x0, y0), 0, (side, side))
        if factor > 1:
            rgb = np.asarray(Image.fromarray(rgb).reduce(factor))
        return band_ratio(rgb)

    return measure


def _stored_tile(reader: SlideReader, axis: str) -> int | None:
    """Level 0's stored tile width or height in px, when the backend says (OpenSlide and tiffslide do)."""
    props = reader.properties
    for vendor in ("openslide", "tiffslide"):
        try:
            value = int(props.get(f"{vendor}.level[0].tile-{axis}", 0))
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def _inside_one_tile(start: float, centre: float, side: int, tile: int | None) -> int:
    """``start`` moved (by less than ``side``) so that the window lies in one stored tile of the file:
    a window across a tile border costs two to four tile decodes instead of one."""
    if tile is None or tile < 2 * side:
        return int(start)
    first = (int(centre) // tile) * tile
    return int(min(max(start, first), first + tile - side))


def blurred_tiles(sharpness: np.ndarray, threshold: float = BLUR_THRESHOLD) -> np.ndarray:
    """Tiles whose sharpness is below ``threshold`` (NaN, i.e. not judged, is never blurred)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(sharpness < threshold) & np.isfinite(sharpness)


def summary(sharpness: np.ndarray, tissue: np.ndarray, threshold: float = BLUR_THRESHOLD) -> dict[str, object]:
    """Counts for a QC report: tissue tiles, judged tiles, blurred tiles, median sharpness."""
    judged = tissue & np.isfinite(sharpness)
    values = sharpness[judged]
    median = float(np.median(values)) if values.size else math.nan
    return {"tissue_tiles": int(tissue.sum()), "judged_tiles": int(judged.sum()),
            "blurred_tiles": int((blurred_tiles(sharpness, threshold) & tissue).sum()),
            "blur_threshold": threshold, "median_sharpness": None if math.isnan(median) else round(median, 4)}
