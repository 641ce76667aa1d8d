"""Labelled training patches cut from annotated slides (IDC-style: 50 px at 4 µm/px).

A user with slides and per-slide tumour masks (or the project's synthetic slides, whose
ground truth is saved beside them) gets a patch store for ``wsi-cmaf train`` without writing
PNGs: the same :class:`~wsi_cmaf.slide.grid.TileGrid` and block reads as inference cut the
tiles, so training sees exactly the pixels inference will see. A tile is labelled tumour when
the mask covers at least ``positive_min`` of it and benign when it covers at most
``negative_max``; tiles in between (tumour borders) are left out rather than given a noisy
label. Each slide is one patient, and splits are assigned per slide (no slide in two splits).

With ``context`` views (e.g. ``[ViewSpec(16, 50)]``: 50 px at 16 µm/px around each tile) the store
also holds every tile's views, cut by :func:`wsi_cmaf.slide.views.read_block_views` from one read
per block and view, exactly as the multi-view inference engine cuts them; a multi-view model
(:class:`wsi_cmaf.models.multiview.MultiViewNet`) then trains on it with the missing-view mask and
view dropout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_cmaf.errors import DataError
from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide, read_block
from wsi_cmaf.slide.grid import tissue_fractions
from wsi_cmaf.slide.views import ViewSpec, as_view_specs, read_block_views, views_attrs
from wsi_cmaf.train.data.patchstore import write_patch_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotatedSlide:
    """A slide, its tumour mask (True = tumour) and the mask's µm/px, anchored at (0, 0)."""

    path: Path
    mask: np.ndarray
    mask_mpp: float
    split: str  # "train", "val" or "test"


@dataclass
class SlidePatches:
    """Labelled tiles of one slide: ``images`` (N, T, T, 3), ``labels`` (N,), and with context views
    ``views`` (one (N, S_v, S_v, 3) array per context view) and ``missing`` (N, 1 + n_context)."""

    images: np.ndarray
    labels: np.ndarray
    views: list[np.ndarray]
    missing: np.ndarray


def view_specs(grid_config: GridConfig, context: Sequence[ViewSpec | dict]) -> list[dict[str, float | int]]:
    """The store's / model's ``views`` list: the tile itself, then each context view."""
    return views_attrs([ViewSpec(float(grid_config.mpp), int(grid_config.tile_size)), *as_view_specs(context)])


def slide_patches(item: AnnotatedSlide, grid_config: GridConfig, *, positive_min: float = 0.5,
                  negative_max: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Tissue tiles of one slide and their labels: ``(uint8 (N, T, T, 3), int64 (N,))``.

    Whole tiles only: a partial edge tile's tumour fraction would be measured over pixels partly
    beyond the slide, and its white padding would become "benign" evidence; inference still
    analyses such tiles (``GridConfig.min_inside_fraction``).
    """
    cut = slide_patch_views(item, grid_config, (), positive_min=positive_min, negative_max=negative_max)
    return cut.images, cut.labels


def slide_patch_views(item: AnnotatedSlide, grid_config: GridConfig, context: Sequence[ViewSpec | dict], *,
                      positive_min: float = 0.5, negative_max: float = 0.05) -> SlidePatches:
    """:func:`slide_patches` plus each tile's ``context`` views (one read per block and view)."""
    specs = as_view_specs(context)
    grid_config = replace(grid_config, min_inside_fraction=1.0)
    with open_slide(item.path) as reader:
        tissue = detect_tissue(reader)
        grid = TileGrid.from_slide(reader, grid_config, tissue)
        m = float(item.mask_mpp)
        tumour = tissue_fractions(np.asarray(item.mask, dtype=bool), (m, m), grid_config.mpp,
                                  grid_config.tile_size, grid_config.step, grid.shape)
        images, labels, missing = [], [], []
        views: list[list[np.ndarray]] = [[] for _ in specs]
        for block in grid.blocks:
            tiles = read_block(reader, grid, block)
            frac = tumour[tiles.rows, tiles.cols]
            keep = (frac >= positive_min) | (frac <= negative_max)
            images.append(tiles.tiles[keep])
            labels.append((frac[keep] >= positive_min).astype(np.int64))
            if specs:
                cut = read_block_views(reader, grid, block, specs, rows=tiles.rows[keep], cols=tiles.cols[keep])
                for acc, arr in zip(views, cut.views):
                    acc.append(arr)
                missing.append(cut.missing)
    t = grid_config.tile_size
    n_views = 1 + len(specs)
    if not images:
        return SlidePatches(np.zeros((0, t, t, 3), np.uint8), np.zeros(0, np.int64),
                            [np.zeros((0, s.size, s.size, 3), np.uint8) for s in specs], np.zeros((0, n_views), bool))
    miss = np.concatenate(missing) if specs else np.zeros((sum(len(y) for y in labels), 0), bool)
    # view 0 is the tile itself: present by construction
    miss = np.concatenate([np.zeros((len(miss), 1), bool), miss], axis=1)
    return SlidePatches(np.concatenate(images), np.concatenate(labels), [np.concatenate(v) for v in views], miss)


def read_slide_table(path: str | Path) -> list[AnnotatedSlide]:
    """Slides of a CSV with columns ``slide``, ``split`` and optionally ``mask`` and ``mask_mpp``.

    ``mask`` is an image whose bright pixels (> 127) are tumour, anchored at the slide's (0, 0)
    with ``mask_mpp`` µm/px; without it the ground truth saved beside a synthetic slide
    (``wsi-cmaf synth``) is used. Relative paths are relative to the CSV's folder.
    """
    import pandas as pd
    from PIL import Image

    from wsi_cmaf.slide.synthetic import load_tumour_mask

    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the slide table {path}: {exc}") from exc
    need = {"slide", "split"} - set(frame.columns)
    if need:
        raise DataError(f"{path}: missing column(s) {sorted(need)}; columns are slide, split[, mask, mask_mpp]")
    out, bad = [], []
    for i, row in frame.iterrows():
        line = int(i) + 2
        slide = (path.parent / row["slide"]).resolve()
        mask_file = str(row.get("mask", "")).strip()
        try:
            if mask_file:
                mpp = float(row.get("mask_mpp", ""))
                with Image.open(path.parent / mask_file) as im:
                    mask = np.asarray(im.convert("L")) > 127
            else:
                mask, mpp = load_tumour_mask(slide)
        except (OSError, ValueError, KeyError) as exc:
            bad.append(f"line {line}: {slide.name}: no usable tumour mask ({exc}); give mask and mask_mpp columns")
            continue
        if not slide.is_file():
            bad.append(f"line {line}: slide {slide} does not exist")
            continue
        out.append(AnnotatedSlide(slide, mask, mpp, str(row["split"]).strip()))
    if bad:
        raise DataError(f"{path}: slides that cannot be used", bad)
    return out


def build_slide_patch_store(slides: Sequence[AnnotatedSlide], out: str | Path,
                            grid_config: GridConfig | None = None, *, context: Sequence[ViewSpec | dict] = (),
                            **label_kwargs: float) -> dict[str, dict[str, int]]:
    """Cut every slide into labelled tiles and write one patch store; returns counts per split.

    ``context``: views to store beside each tile (a multi-view store; see the module docstring).
    """
    grid_config = grid_config or GridConfig()
    bad = [f"{s.path}: split {s.split!r}" for s in slides if s.split not in ("train", "val", "test")]
    if bad:
        raise DataError("slides need a split of train/val/test", bad)
    images, labels, patients, splits, views, missing = [], [], [], [], [], []
    for item in slides:
        cut = slide_patch_views(item, grid_config, context, **label_kwargs)
        y = cut.labels
        logger.info("%s: %d tiles (%d tumour) -> %s", item.path.name, len(y), int(y.sum()), item.split)
        if context:
            logger.info("%s: context views missing (off the slide) for %s tiles", item.path.name,
                        cut.missing[:, 1:].sum(axis=0).tolist())
        images.append(cut.images)
        labels.append(y)
        views.append(cut.views)
        missing.append(cut.missing)
        patients.append(np.full(len(y), item.path.stem, dtype=object))
        splits.append(np.full(len(y), item.split, dtype=object))
    y_all = np.concatenate(labels)
    split_all = np.concatenate(splits)
    counts = {s: {"patches": int((split_all == s).sum()), "tumour": int(y_all[split_all == s].sum())}
              for s in ("train", "val", "test")}
    empty = [s for s, c in counts.items() if c["patches"] == 0]
    if empty:
        raise DataError(f"no tiles in split(s) {empty}: give those splits slides with tissue")
    view_kwargs: dict[str, Any] = {}
    if context:
        view_kwargs = {"views": view_specs(grid_config, context),
                       "view_images": [np.concatenate(v) for v in zip(*views)],
                       "view_missing": np.concatenate(missing)}
    write_patch_store(out, np.concatenate(images), y_all, np.concatenate(patients), split_all,
                      attrs={"source": "annotated slides", "grid": {"mpp": grid_config.mpp,
                                                                    "tile_size": grid_config.tile_size}},
                      **view_kwargs)
    return counts
