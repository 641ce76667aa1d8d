"""Fit the slide's Macenko stain matrix once, from a sample of its tissue tiles."""

from __future__ import annotations

import logging

import numpy as np

from wsi_cmaf.errors import WsiCmafError
from wsi_cmaf.slide.grid import TileGrid, read_tile
from wsi_cmaf.stain import MacenkoNormalizer, fit_macenko

logger = logging.getLogger(__name__)

#: tissue tiles read for the fit, spread over the slide by a seeded draw.
SAMPLE_TILES = 64
#: at most this many of their pixels go into the fit; enough for stable eigenvectors.
SAMPLE_PIXELS = 200_000


def fit_slide_stain(reader, grid: TileGrid, seed: int = 0) -> tuple[MacenkoNormalizer | None, str | None]:
    """Return a normaliser fitted to the slide (or None and a warning when the fit is impossible).

    The pixels are those of up to :data:`SAMPLE_TILES` tissue tiles drawn with a fixed seed and
    read exactly as the model sees them (the grid's µm/px), so reruns and resumed runs get the
    same matrix and the percentile concentrations match the tiles being normalised (a coarser
    thumbnail averages nuclei with stroma and underestimates them by 10-30 %). The training
    package fits its per-patient matrices on patch pixels for the same reason. Tiles that cannot
    be decoded are left out; the loop reports their blocks.
    """
    rows, cols = np.nonzero(grid.tissue)
    if rows.size == 0:
        return None, "no tissue tiles to fit the stain matrix; stain normalisation skipped"
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(rows.size, size=min(SAMPLE_TILES, rows.size), replace=False))
    tiles = []
    for i in pick:  # raster order: neighbouring tiles share the slide's own decoded tiles
        try:
            tiles.append(read_tile(reader, grid, int(rows[i]), int(cols[i])))
        except WsiCmafError as exc:
            logger.debug("stain fit: tile (%d, %d) unreadable: %s", rows[i], cols[i], exc)
    if not tiles:
        return None, "no readable tissue tile to fit the stain matrix; stain normalisation skipped"
    pixels = np.concatenate([t.reshape(-1, 3) for t in tiles])
    if len(pixels) > SAMPLE_PIXELS:
        pixels = pixels[np.sort(rng.choice(len(pixels), SAMPLE_PIXELS, replace=False))]
    try:
        fit = fit_macenko(pixels)
    except WsiCmafError as exc:
        logger.warning("Macenko fit failed: %s", exc)
        return None, f"stain matrix could not be fitted ({exc}); stain normalisation skipped"
    norm = MacenkoNormalizer()
    norm.set_source(fit)
    return norm, None
