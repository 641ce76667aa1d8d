"""Labelled training patches cut from annotated slides (IDC-style: 50 px at 4 µm/px).

A user with slides and per-slide tumour masks (or the project's synthetic slides, whose
ground truth is saved beside them) gets a patch store for ``wsi-cmaf train`` without writing
PNGs: the same :class:`~wsi_cmaf.slide.grid.TileGrid` and block reads as inference cut the
tiles, so training sees exactly the pixels inference will see. A tile is labelled tumour when
the mask covers at least ``positive_min`` of it and benign when it covers at most
``negative_max``; tiles in between (tumour borders) are left out rather than given a noisy
label. Each slide is one patient, and splits are assigned per slide (no slide in two splits).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wsi_cmaf.errors import DataError
from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide, read_block
from wsi_cmaf.slide.grid import tissue_fractions
from wsi_cmaf.train.data.patchstore import write_patch_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotatedSlide:
    """A slide, its tumour mask (True = tumour) and the mask's µm/px, anchored at (0, 0)."""

    path: Path
    mask: np.ndarray
    mask_mpp: float
    split: str  # "train", "val" or "test"


def slide_patches(item: AnnotatedSlide, grid_config: GridConfig, *, positive_min: float = 0.5,
                  negative_max: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Tissue tiles of one slide and their labels: ``(uint8 (N, T, T, 3), int64 (N,))``.

    Whole tiles only: a partial edge tile's tumour fraction would be measured over pixels partly
    beyond the slide, and its white padding would become "benign" evidence; inference still
    analyses such tiles (``GridConfig.min_inside_fraction``).
    """
    grid_config = replace(grid_config, min_inside_fraction=1.0)
    with open_slide(item.path) as reader:
        tissue = detect_tissue(reader)
        grid = TileGrid.from_slide(reader, grid_config, tissue)
        m = float(item.mask_mpp)
        tumour = tissue_fractions(np.asarray(item.mask, dtype=bool), (m, m), grid_config.mpp,
                                  grid_config.tile_size, grid_config.step, grid.shape)
        images, labels = [], []
        for block in grid.blocks:
            tiles = read_block(reader, grid, block)
            frac = tumour[tiles.rows, tiles.cols]
            keep = (frac >= positive_min) | (frac <= negative_max)
            images.append(tiles.tiles[keep])
            labels.append((frac[keep] >= positive_min).astype(np.int64))
    if not images:
        return np.zeros((0, grid_config.tile_size, grid_config.tile_size, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


def build_slide_patch_store(slides: Sequence[AnnotatedSlide], out: str | Path,
                            grid_config: GridConfig | None = None, **label_kwargs: float) -> dict[str, object]:
    """Cut every slide into labelled tiles and write one patch store; returns counts per split."""
    grid_config = grid_config or GridConfig()
    bad = [f"{s.path}: split {s.split!r}" for s in slides if s.split not in ("train", "val", "test")]
    if bad:
        raise DataError("slides need a split of train/val/test", bad)
    images, labels, patients, splits = [], [], [], []
    for item in slides:
        x, y = slide_patches(item, grid_config, **label_kwargs)
        logger.info("%s: %d tiles (%d tumour) -> %s", item.path.name, len(y), int(y.sum()), item.split)
        images.append(x)
        labels.append(y)
        patients.append(np.full(len(y), item.path.stem, dtype=object))
        splits.append(np.full(len(y), item.split, dtype=object))
    y_all = np.concatenate(labels)
    split_all = np.concatenate(splits)
    counts = {s: {"patches": int((split_all == s).sum()), "tumour": int(y_all[split_all == s].sum())}
              for s in ("train", "val", "test")}
    empty = [s for s, c in counts.items() if c["patches"] == 0]
    if empty:
        raise DataError(f"no tiles in split(s) {empty}: give those splits slides with tissue")
    write_patch_store(out, np.concatenate(images), y_all, np.concatenate(patients), split_all,
                      attrs={"source": "annotated slides", "grid": {"mpp": grid_config.mpp,
                                                                    "tile_size": grid_config.tile_size}})
    return counts
