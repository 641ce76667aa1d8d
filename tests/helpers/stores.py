"""A finalized heatmap store made by hand, with known geometry, for the viewer tests.

The grid is 3 x 4 tiles of 50 px at 4 µm/px (200 µm), tile (0, 0)'s top-left at level-0 (64, 32)
of a slide at 0.5 µm/px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_cmaf.output.store import HeatmapStore

SLIDE_MPP = 0.5
ORIGIN = (64, 32)      # level-0 (x, y) px of tile (0, 0)'s top-left corner
TILE_UM = 50 * 4.0     # 200 µm: tile edge and stride
GRID = (3, 4)          # rows, cols


def make_store(path: Path, slide: Path | None, *, mpp_source: str = "vendor",
               identity: dict | None = None) -> HeatmapStore:
    """A finalized 2-class store whose malignant probability is row/10 + col/100."""
    attrs = {"grid": {"tile_origin_level0": list(ORIGIN), "tile_size": 50, "mpp": 4.0},
             "slide": {"path": None if slide is None else str(slide), "mpp": [SLIDE_MPP, SLIDE_MPP],
                       "mpp_source": mpp_source},
             "model": {"name": "m", "config": {"positive_class": 1}}}
    store = HeatmapStore.open_or_create(
        path, grid_shape=GRID, chunk=(2, 2), class_names=["benign", "malignant"], identity=identity or {"k": 1},
        attrs=attrs, um_per_tile=(TILE_UM, TILE_UM))
    rows, cols = np.mgrid[0:GRID[0], 0:GRID[1]]
    p = (rows / 10 + cols / 100).astype(np.float32)
    p[0, 0] = np.nan  # no tissue
    probs = np.stack([1 - p, p])
    for by in range(store.done.shape[0]):
        for bx in range(store.done.shape[1]):
            rs, cs = store.block_slices((by, bx))
            store.write_block((by, bx), probs[:, rs, cs])
    store.write_tissue(np.isfinite(p))
    store.finalize()
    return store
