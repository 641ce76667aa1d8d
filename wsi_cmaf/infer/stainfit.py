"""Fit the slide's Macenko stain matrix once, from a sample of its tissue pixels."""

from __future__ import annotations

import logging

import numpy as np
from skimage.transform import resize

from wsi_cmaf.errors import WsiCmafError
from wsi_cmaf.stain import MacenkoNormalizer, fit_macenko

logger = logging.getLogger(__name__)

#: pixels sampled for the fit; enough for stable eigenvectors, cheap to fit.
SAMPLE_PIXELS = 200_000


def fit_slide_stain(reader, grid, seed: int = 0) -> tuple[MacenkoNormalizer | None, str | None]:
    """Return a normaliser fitted to the slide (or None and a warning when the fit is impossible).

    The sample is drawn with a fixed seed from tissue pixels of a thumbnail at twice the tile
    spacing, so reruns (and resumed runs) get the same matrix.
    """
    thumb = reader.thumbnail(2.0 * grid.config.mpp)
    tissue = resize(grid.tissue.astype(np.float32), thumb.shape[:2], order=0) > 0.5
    pixels = thumb[tissue]
    if len(pixels) == 0:
        return None, "no tissue pixels to fit the stain matrix; stain normalisation skipped"
    rng = np.random.default_rng(seed)
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
