"""Fit the slide's Macenko stain matrix once, from a sample of its tissue tiles.

Where the time went (TCGA JPEG 2000 slide, 13 tissue tiles, 2 CPU cores): ~0.35 s of 13 single
tile reads through OpenSlide (each decodes the 240 px JPEG 2000 tiles under a 400 px window
again, 26 ms a tile), ~0.1 s importing torchstain on the first fit, ~6 ms the fit itself; and
then the loop decoded the same tiles again. So:

* when the sample is every tissue tile (slides with <= :data:`SAMPLE_TILES` of them), the fit
  takes its pixels from the loop's own block reads (:func:`fit_from_blocks`): one decode, no
  second pass;
* otherwise the sample's single tiles are read through the opening reader (open already,
  OpenSlide caches its decoded tiles) while the first blocks already decode on the reader
  threads. (Reading the sample as tasks on the reader threads was measured slower on 2 cores:
  0.39 s vs 0.08-0.11 s, each thread opening the file first.)
"""

from __future__ import annotations

import logging

import numpy as np

from wsi_cmaf.errors import WsiCmafError
from wsi_cmaf.slide.grid import BlockTiles, TileGrid
from wsi_cmaf.slide.reads import read_tile
from wsi_cmaf.stain import MacenkoNormalizer, fit_macenko

logger = logging.getLogger(__name__)

#: tissue tiles read for the fit, spread over the slide by a seeded draw.
SAMPLE_TILES = 64
#: at most this many of their pixels go into the fit; enough for stable eigenvectors.
SAMPLE_PIXELS = 200_000

FitResult = tuple[MacenkoNormalizer | None, str | None]


def sample_tiles(grid: TileGrid, seed: int = 0) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """The seeded draw of sample tiles (raster order) and the generator the fit goes on with."""
    rows, cols = np.nonzero(grid.tissue)
    rng = np.random.default_rng(seed)
    if rows.size == 0:
        return rng, rows, cols
    pick = np.sort(rng.choice(rows.size, size=min(SAMPLE_TILES, rows.size), replace=False))
    return rng, rows[pick], cols[pick]


def sample_is_all_tissue(grid: TileGrid) -> bool:
    """True when the sample is every tissue tile, so the block reads can supply its pixels."""
    return 0 < grid.n_tissue <= SAMPLE_TILES


def read_sample(reader, grid: TileGrid, rows: np.ndarray, cols: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """(row, col, tile) of every sampled tile that decodes; undecodable ones are left out (the
    block reads report them as failed tiles)."""
    out = []
    skipped: list[str] = []
    for r, c in zip(rows.tolist(), cols.tolist()):  # raster order: neighbours share decoded slide tiles
        try:
            out.append((r, c, read_tile(reader, grid, r, c)))
        except WsiCmafError as exc:
            skipped.append(f"({r}, {c}): {exc}")
    if skipped:
        logger.warning("stain fit: %d of %d sampled tiles undecodable, fitted without them; first %s",
                       len(skipped), len(rows), skipped[0])
    return out


def fit_from_tiles(tiles: list[tuple[int, int, np.ndarray]], rng: np.random.Generator) -> FitResult:
    """Fit from sampled tiles; they are put in raster order first, so the result does not depend
    on which reader thread finished first."""
    if not tiles:
        return None, "no readable tissue tile to fit the stain matrix; stain normalisation skipped"
    tiles = sorted(tiles, key=lambda t: (t[0], t[1]))
    pixels = np.concatenate([t[2].reshape(-1, 3) for t in tiles])
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


def fit_from_blocks(grid: TileGrid, items: list, seed: int = 0) -> FitResult:
    """Fit from the block reads of a slide whose sample is all its tissue tiles.

    ``items`` are the :class:`BlockTiles` of every tissue block (failures are skipped: their
    tiles are unreadable, as single reads of them would be).
    """
    if not sample_is_all_tissue(grid):
        raise ValueError("fit_from_blocks needs a slide with 1..SAMPLE_TILES tissue tiles")
    rng, _, _ = sample_tiles(grid, seed)  # same generator state as the sampled path
    tiles = [(int(r), int(c), t) for it in items if isinstance(it, BlockTiles)
             for r, c, t in zip(it.rows, it.cols, it.tiles)]
    return fit_from_tiles(tiles, rng)


def fit_slide_stain(reader, grid: TileGrid, seed: int = 0) -> FitResult:
    """Return a normaliser fitted to the slide (or None and a warning when the fit is impossible).

    The pixels are those of up to :data:`SAMPLE_TILES` tissue tiles drawn with a fixed seed and
    read exactly as the model sees them (the grid's µm/px), so reruns and resumed runs get the
    same matrix and the percentile concentrations match the tiles being normalised (a coarser
    thumbnail averages nuclei with stroma and underestimates them by 10-30 %). The training
    package fits its per-patient matrices on patch pixels for the same reason. Tiles that cannot
    be decoded are left out; the loop reports their blocks. (Sequential reads in this thread;
    ``analyze_slide`` reads the same sample on its reader threads.)
    """
    rng, rows, cols = sample_tiles(grid, seed)
    if rows.size == 0:
        return None, "no tissue tiles to fit the stain matrix; stain normalisation skipped"
    return fit_from_tiles(read_sample(reader, grid, rows, cols), rng)
