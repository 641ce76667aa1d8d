"""The run summary: probabilities, counts and the tiles that could not be decoded (with level-0 boxes)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from wsi_cmaf.infer.result import SlideResult
from wsi_cmaf.infer.run import SlideRun
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.slide.grid import TileGrid
from wsi_cmaf.slide.tissue import TissueMask

logger = logging.getLogger(__name__)

#: most failed tiles listed one by one in a summary (the count is always exact)
MAX_LISTED_FAILURES = 10_000


def _tile_size_level0(grid: TileGrid) -> tuple[int, int]:
    """(width, height) in level-0 px of the region one tile of ``grid`` reads."""
    if grid.config.source == "level0":
        # WSInfer's square P x P patch; the effective µm/px over mpp_x or mpp_y would give
        # P * mean / mpp_x by P * mean / mpp_y on a slide whose pixels are not square
        patch = grid.level0_pitch[0]
        return patch, patch
    w, h = (int(round(grid.config.tile_size * grid.config.mpp / m)) for m in grid.slide_mpp)
    return w, h


def failure_records(grid: TileGrid, store: HeatmapStore, mask: TissueMask) -> tuple[int, list[dict[str, Any]]]:
    """(number of grid tissue tiles without a probability because of read failures, records).

    Records: the tissue stage's undecodable slide tiles (``stage`` "tissue") and the grid tiles
    the block reads could not decode (``stage`` "inference"; a wholly failed block lists all of
    its tissue tiles), each with level-0 ``x``, ``y``, ``width``, ``height`` and ``reason``.
    """
    records = [{"stage": "tissue", **f.to_dict()} for f in mask.failed_tiles]
    bad = store.failed_tiles & grid.tissue
    block_errors = store.errors
    k0, k1 = grid.block_shape
    for by, bx in zip(*np.nonzero(store.failed & ~store.done)):
        block_rows, block_cols = slice(by * k0, (by + 1) * k0), slice(bx * k1, (bx + 1) * k1)
        bad[block_rows, block_cols] |= grid.tissue[block_rows, block_cols]
    tile_errors = store.tile_errors
    rows, cols = np.nonzero(bad)
    size = _tile_size_level0(grid)
    for r, c in zip(rows[:MAX_LISTED_FAILURES].tolist(), cols[:MAX_LISTED_FAILURES].tolist()):
        key = (r // k0, c // k1)
        x, y = grid.tile_location(r, c)
        records.append({"stage": "inference", "row": r, "col": c, "x": int(x), "y": int(y),
                        "width": size[0], "height": size[1],
                        "reason": tile_errors.get(key) or block_errors.get(key) or "unreadable"})
    if rows.size > MAX_LISTED_FAILURES:
        logger.warning("%d failed tiles; the summary lists the first %d", rows.size, MAX_LISTED_FAILURES)
    return int(rows.size), records


def summarise(run: SlideRun, outputs: dict[str, Any], computed: int, skipped: int,
              failures: tuple[int, list]) -> SlideResult:
    """The :class:`SlideResult` of a finished run (counts, probabilities, failures, timings); the
    decoding warnings join ``run.warnings``."""
    slide_path, reader, grid, mask, store = run.path, run.reader, run.grid, run.mask, run.store
    resolved, cfg, dev, timer, warn = run.resolved, run.cfg, run.device, run.timer, run.warnings
    probs = store.probabilities(0)
    pos = probs[resolved.config.positive_class]
    valid = grid.tissue & np.isfinite(pos)
    values = pos[valid]
    failed_blocks = store.failed & ~store.done
    failed_tiles, records = failures
    n_tile_faults = int((store.failed_tiles & grid.tissue).sum())
    if n_tile_faults:
        warn.append(f"{n_tile_faults} tissue tile(s) could not be decoded: NaN in the heatmap, listed in failed_tiles")
    if mask.failed_tiles:
        warn.append(f"{len(mask.failed_tiles)} slide tile(s) could not be decoded for the tissue mask "
                    "(counted as background), listed in failed_tiles")
    return SlideResult(
        slide=slide_path, outputs=outputs,
        tiles_total=int(grid.shape[0] * grid.shape[1]), tiles_tissue=int(grid.tissue.sum()),
        tiles_failed=failed_tiles, blocks_total=len(grid.blocks), blocks_computed=computed,
        blocks_skipped=skipped, blocks_failed=int(failed_blocks.sum()),
        tissue_area_mm2=float(mask.mask.sum() * mask.mpp * mask.mpp / 1e6),
        positive_fraction=float((values >= cfg.decision_threshold).mean()) if values.size else 0.0,
        max_probability=float(values.max()) if values.size else 0.0,
        mean_probability=float(values.mean()) if values.size else 0.0,
        timings={k: round(v, 4) for k, v in timer.items()}, device=str(dev), backend=reader.backend,
        mpp=tuple(reader.mpp), mpp_source=reader.mpp_source, model_name=resolved.name,
        weights_note=resolved.note, warnings=warn, failed_tiles=records,
        tissue_stage_failed_tiles=len(mask.failed_tiles), tasks=task_summary(store, grid.tissue),
    )


def task_summary(store: HeatmapStore, tissue: np.ndarray) -> dict[str, Any]:
    """Per task of a multi-task store (primary first): classes, store group and the mean
    probability of each class over the tissue tiles with a value; {} for a single-task store."""
    from wsi_cmaf.output.task_groups import task_group_path

    out: dict[str, Any] = {}
    for i, (task, classes) in enumerate(store.tasks.items()):
        probs = store.probabilities(0, None if i == 0 else task)
        valid = tissue & np.isfinite(probs).all(axis=0)
        means = probs[:, valid].mean(axis=1) if valid.any() else np.zeros(len(classes))
        out[task] = {"classes": list(classes), "store_group": "/" if i == 0 else task_group_path(task),
                     "mean_probability": {c: round(float(m), 6) for c, m in zip(classes, means)}}
    return out
