"""Marker ink excluded from the tissue mask: the real DICOM's green and blue marks, synthetic marks
of each colour painted over real tissue, and tiles that are mostly ink left out and counted."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import line

from wsi_cmaf.slide import GridConfig, TileGrid, open_slide
from wsi_cmaf.slide.tissue import TissueConfig, tissue_mask_from_rgb

#: marker colours as scanned (RGB); red is a saturated marker red, not eosin or blood
MARKERS = {"green": (40, 150, 90), "blue": (40, 60, 170), "black": (38, 36, 42), "red": (190, 20, 35)}


def _independent_marks(rgb: np.ndarray) -> np.ndarray:
    """Green or blue marker by a rule the detector does not use: G or B over R by > 25 grey levels
    (H&E's pink and purple keep R at or above G and near B; no tissue pixel of the clean CMU and
    TCGA slides passes it at 8 µm/px)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (g - r > 25) | (b - r > 25)


@pytest.mark.realdata
def test_dicom_ink_tiles_excluded_and_tissue_beside_them_kept(real_slide) -> None:
    with open_slide(real_slide("dicom"), mpp=0.5) as r:  # the file has no µm/px; 0.5 sizes the thumbnail
        thumb = np.asarray(r.thumbnail(8.0))
        old = tissue_mask_from_rgb(thumb, 8.0, TissueConfig(exclude_ink=False))
        new = tissue_mask_from_rgb(thumb, 8.0)
        cfg = GridConfig(mpp=2.0, tile_size=64)  # 128 µm tiles: 16 x 16 mask pixels each
        g_old, g_new = TileGrid.from_slide(r, cfg, old), TileGrid.from_slide(r, cfg, new)
    marks = _independent_marks(thumb)
    assert marks.sum() > 1500  # the slide has green and blue marks ...
    assert (marks & old.mask).sum() > 500  # ... which the old mask took for tissue
    assert (marks & new.mask).sum() < 0.03 * marks.sum()  # and the new one does not
    assert 0.15 < new.ink_fraction() < 0.35
    # per tile, from the independent marks (mask pixels are 8 µm, a tile 16 px)
    n_rows, n_cols = g_new.shape
    k = 16
    ink_share = np.zeros((n_rows, n_cols))
    for i in range(n_rows):
        for j in range(n_cols):
            cell = marks[i * k:(i + 1) * k, j * k:(j + 1) * k]
            ink_share[i, j] = cell.mean() if cell.size else 0.0
    # a tile is 16 x 16 mask px of 8 µm; at a 0.5 tissue threshold the tiles the old mask analysed
    # with most marker ink were those where blue marker (kept as tissue) filled up the tissue share
    inked = g_old.tissue & (ink_share >= 0.3)
    assert inked.sum() >= 5
    assert not (g_new.tissue & inked).any()
    assert g_new.ink_tiles.sum() >= 5  # counted as tiles left out for ink
    clean = g_old.tissue & (ink_share == 0)
    assert clean.sum() >= 25
    assert g_new.tissue[clean].all()  # H&E next to the marks stays in
    assert g_new.n_tissue < g_old.n_tissue


@pytest.mark.realdata
@pytest.mark.parametrize("colour", sorted(MARKERS))
def test_synthetic_marks_over_real_tissue(real_slide, colour: str) -> None:
    with open_slide(real_slide("jp2k_svs"), mpp=0.9) as r:  # clean H&E without ink (µm/px as estimated)
        thumb = np.asarray(r.thumbnail(8.0)).copy()
    clean = tissue_mask_from_rgb(thumb, 8.0)
    assert clean.ink_fraction() == 0.0  # no false ink on clean H&E
    stroke = np.zeros(thumb.shape[:2], bool)
    h, w = stroke.shape
    for off in range(-4, 5):  # a 9-px (72 µm) wide marker line across the tissue
        rr, cc = line(int(h * 0.2) + off, int(w * 0.1), int(h * 0.8) + off, int(w * 0.9))
        stroke[rr, cc] = True
    rng = np.random.default_rng(1)
    painted = thumb.copy()
    painted[stroke] = np.clip(np.array(MARKERS[colour]) + rng.integers(-6, 7, (stroke.sum(), 3)), 0, 255)
    marked = tissue_mask_from_rgb(painted, 8.0)
    on_tissue = stroke & clean.mask
    assert on_tissue.sum() > 500
    assert (marked.mask & stroke).sum() <= 0.02 * stroke.sum()  # the mark is not tissue
    assert (marked.ink & on_tissue).sum() >= 0.95 * on_tissue.sum()  # and is reported as ink
    from scipy import ndimage as ndi

    away = clean.mask & ~ndi.binary_dilation(stroke, iterations=3)
    assert (marked.mask & away).sum() >= 0.99 * away.sum()  # tissue away from it stays in
    # the reported ink is the stroke and the one-pixel rim the detector adds around it
    rim = ndi.binary_dilation(stroke, structure=np.ones((3, 3), bool))
    expected = rim.sum() / (rim.sum() + marked.mask.sum())
    assert marked.ink_fraction() == pytest.approx(expected, rel=0.1)


def test_mostly_ink_tiles_not_analysed_and_counted() -> None:
    frac = np.array([[0.3, 0.6, 0.3, 0.0]], np.float32)
    ink = np.array([[0.6, 0.1, 0.1, 0.0]], np.float32)
    cfg = GridConfig(mpp=1.0, tile_size=10, tissue_threshold=0.5, block_tiles=4)
    g = TileGrid(cfg, 0, 1.0, (1.0, 1.0), (40, 10), frac, ink)
    assert g.tissue.tolist() == [[False, True, False, False]]
    assert g.ink_tiles.tolist() == [[True, False, False, False]]  # 0.9 marked, two thirds ink
    low = GridConfig(mpp=1.0, tile_size=10, tissue_threshold=0.2, block_tiles=4)
    g = TileGrid(low, 0, 1.0, (1.0, 1.0), (40, 10), frac, ink)
    # 30 % tissue passes a 0.2 threshold, but the tile is mostly ink: not analysed
    assert g.tissue.tolist() == [[False, True, True, False]]
    assert g.ink_tiles.tolist() == [[True, False, False, False]]
    assert TileGrid(low, 0, 1.0, (1.0, 1.0), (40, 10), frac).tissue.tolist() == [[True, True, True, False]]
