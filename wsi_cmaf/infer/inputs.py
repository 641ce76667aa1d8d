"""A run's inputs that a resumed run reuses from the store: tissue mask, grid, stain fit, overlay background.

The first run stores them as soon as they exist (tissue mask and grid before the first block is
computed, the stain fit right after it is made). A resumed run whose store identity matches (slide
fingerprint, model, weights, grid, tissue and stain settings: :func:`run_identity`) takes them
from the store, so it costs only the blocks left to compute, and it computes those with exactly
the inputs the first run used (bit-identical heatmaps).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_cmaf.infer.modelspec import ResolvedModel, config_identity
from wsi_cmaf.output._json import jsonable
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.store_layout import read_store_meta
from wsi_cmaf.slide.faults import TileFailure
from wsi_cmaf.slide.grid import GridConfig, TileGrid, level0_grid_config, mask_tile_fractions
from wsi_cmaf.slide.tissue import TissueConfig, TissueMask
from wsi_cmaf.stain import MacenkoNormalizer, StainFit
from wsi_cmaf.zarr_nodes import member_array, read

logger = logging.getLogger(__name__)

@dataclass
class RunInputs:
    """Tissue mask, tile grid and overlay background of one run (computed or reused)."""

    mask: TissueMask
    grid: TileGrid
    background: np.ndarray | None
    #: stain facts stored by an earlier run ({"method", "fit", "warning"}), None when not stored yet
    stain: dict[str, Any] | None = None


def run_identity(reader: Any, resolved: ResolvedModel, grid_config: GridConfig, tissue: TissueConfig,
                 stain_method: str) -> dict[str, Any]:
    """What must match for a store to be resumed; computable before the tissue stage."""
    w0, h0 = reader.level_dimensions[0]
    shape = TileGrid.grid_shape((w0, h0), reader.mpp, grid_config)
    level = reader.level_for_mpp(grid_config.mpp, grid_config.mpp_tolerance)
    return {
        "slide_fingerprint": reader.fingerprint(),
        "model": resolved.name,
        "weights_sha256": resolved.weights_sha256,
        "model_config": config_identity(resolved.config),
        "grid": {"shape": list(shape), "level": int(level),
                 "config": {k: getattr(grid_config, k) for k in vars(grid_config)}},
        # the stored tissue mask and stain fit are reused only when they were made the same way
        "tissue": asdict(tissue),
        "stain": stain_method,
    }


def load_inputs(path: Path, identity: dict[str, Any], reader: Any, grid_config: GridConfig) -> RunInputs | None:
    """The inputs stored in the store at ``path`` when it is a complete store of the same
    ``identity`` holding them; None otherwise (the caller computes them)."""
    meta = read_store_meta(path) if path.is_dir() else None
    if meta is None or not meta.get("layout_complete") or meta.get("identity") != jsonable(identity):
        return None  # open_or_create decides what to do with it (and names any mismatch)
    store = HeatmapStore.open(path, "r")
    facts = store.inputs().get("tissue")
    stored_mask, fraction = store.tissue_mask(), store.tissue_fraction()
    if not facts or not facts.get("complete") or stored_mask is None:
        logger.info("%s: no stored tissue mask and grid; computing them", path)
        return None
    mask, mpp = stored_mask
    failures = tuple(TileFailure(int(f["level"]), tuple(f["location"]), tuple(f["size"]), tuple(f["level_box"]),
                                 str(f["reason"])) for f in facts.get("failed_tiles", []))
    threshold = facts.get("threshold")
    level = reader.level_for_mpp(grid_config.mpp, grid_config.mpp_tolerance)
    w0, h0 = reader.level_dimensions[0]
    # the marker ink the first run cut out: the same tiles stay out, the same ink area is reported
    meta_group = store._meta_group
    ink = read(member_array(meta_group, "ink_mask")).astype(bool) if "ink_mask" in meta_group else None
    ink_fraction = None
    if ink is not None:
        cfg = level0_grid_config(grid_config, reader.mpp) if grid_config.source == "level0" else grid_config
        ink_fraction = mask_tile_fractions(ink, mpp, (int(w0), int(h0)), tuple(reader.mpp), cfg, fraction.shape)
    tissue = TissueMask(mask, mpp, float("nan") if threshold is None else float(threshold), failed_tiles=failures,
                        ink=ink)
    grid = TileGrid(grid_config, level, float(reader.level_downsamples[level]),
                    (float(reader.mpp[0]), float(reader.mpp[1])), (int(w0), int(h0)), fraction, ink_fraction)
    if grid.shape != tuple(identity["grid"]["shape"]):  # cannot happen for a store we wrote
        logger.warning("%s: stored grid has shape %s, expected %s; recomputing", path, grid.shape,
                       identity["grid"]["shape"])
        return None
    logger.info("%s: reusing the stored tissue mask, grid%s", path,
                " and stain fit" if "stain" in store.inputs() else "")
    return RunInputs(tissue, grid, store.background(), store.inputs().get("stain"))


def save_inputs(store: HeatmapStore, inputs: RunInputs) -> None:
    """Store the tissue mask, the grid's tissue fractions and the overlay background; the
    "complete" fact goes last, so an interrupted save is recomputed, never half reused."""
    grid, mask = inputs.grid, inputs.mask
    store.write_tissue(grid.tissue, grid.tissue_fraction)
    store.write_inside_fraction(grid.inside_fraction)
    store.write_tissue_mask(mask.mask, mask.mpp)
    if mask.ink is not None:  # for resumed runs (the tissue mask above has the ink cut out)
        store._put_meta_array("ink_mask", np.asarray(mask.ink, bool), None, {"mpp": float(mask.mpp)},
                              dims=("mask_y", "mask_x"))
    if inputs.background is not None:
        store.write_background(inputs.background)
    threshold = float(mask.threshold) if np.isfinite(mask.threshold) else None  # JSON has no NaN
    store.write_inputs({"tissue": {"mpp": mask.mpp, "threshold": threshold, "complete": True,
                                   "failed_tiles": [asdict(f) for f in mask.failed_tiles]}})


def save_stain(store: HeatmapStore, method: str, normalizer: MacenkoNormalizer | None, warning: str | None) -> None:
    """Store the stain fit (or that it could not be made, and why) for resumed runs."""
    fit = normalizer.source.to_dict() if normalizer is not None and normalizer.source is not None else None
    store.write_inputs({"stain": {"method": method, "fit": fit, "warning": warning}})


def restore_stain(facts: dict[str, Any]) -> tuple[MacenkoNormalizer | None, str | None]:
    """The normaliser (and warning) of a stored stain fit: the same matrices as the first run's."""
    fit = facts.get("fit")
    if fit is None:
        return None, facts.get("warning")
    return MacenkoNormalizer().set_source(StainFit.from_dict(fit)), facts.get("warning")
