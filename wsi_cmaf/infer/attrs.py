"""The attributes ``analyze_slide`` gives a slide's heatmap store, and the grid's µm spacing.

:func:`_attrs` builds the provenance attributes (slide, grid, tissue, edge tiles, model, inference
config, software) stored with the heatmap; :func:`_um_per_tile` is the tile spacing the store's
geometry is laid out with (see :class:`~wsi_cmaf.output.geometry.TileGeometry`). Resumed runs
compare the stored layout exactly, so what these return for a given grid must not drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsi_cmaf import __version__
from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.modelspec import ResolvedModel, config_identity
from wsi_cmaf.slide.grid import PAD_VALUE, TileGrid
from wsi_cmaf.slide.views import views_attrs


def _stride_level0(grid: TileGrid, slide_mpp: tuple[float, float]) -> tuple[float, float]:
    """(y, x) level-0 px between neighbouring tiles of ``grid`` on a slide of ``slide_mpp`` (x, y)."""
    if grid.config.source == "level0":
        # WSInfer's lattice steps by the whole-pixel S on both axes; the grid's effective µm/px is
        # P * mean(mpp) / tile_size, so dividing it by mpp_x or mpp_y is off on non-square pixels
        stride = float(grid.level0_pitch[1])
        return stride, stride
    um = grid.config.step * grid.config.mpp  # the target grid is resampled to config.mpp on both axes
    return um / slide_mpp[1], um / slide_mpp[0]


def _um_per_tile(grid: TileGrid) -> tuple[float, float]:
    """(y, x) µm between neighbouring tiles: what the store's geometry divides by the slide's µm/px."""
    stride = grid.config.step
    if grid.config.source == "level0":
        # S level-0 px are S * mpp_x by S * mpp_y µm. step * mpp (the effective µm/px) is S * mean, so
        # scale it by mpp / mean: on square pixels that factor is exactly 1.0 and the layout stays
        # bit-identical to stores made before, which a resume compares exactly
        mx, my = (float(v) for v in grid.slide_mpp)
        mean = (mx + my) / 2
        um = stride * grid.config.mpp
        return (um * (my / mean), um * (mx / mean))
    return (stride * grid.config.mpp, stride * grid.config.mpp)


def _tile_size_level0_attrs(grid: TileGrid) -> dict[str, Any]:
    """``{"tile_size_level0": [P, P]}`` for a level-0 grid (its square patch in level-0 px, which
    sizes the store's tiles, see ``TileGeometry.from_attrs``); empty for pyramid grids, whose grid
    attributes stay as they were."""
    if grid.config.source != "level0":
        return {}
    patch = int(grid.level0_pitch[0])
    return {"tile_size_level0": [patch, patch]}


def _attrs(reader, resolved: ResolvedModel, grid: TileGrid, cfg: InferenceConfig, mask) -> dict[str, Any]:
    """The store's provenance attributes for one run of ``resolved`` over ``reader``'s slide."""
    stride = grid.config.stride or grid.config.tile_size
    # keys only for multi-view models: a single-view model's store attributes stay as they were
    views = {"views": views_attrs(resolved.views)} if resolved.views else {}
    return {**views,
        "slide": {"path": str(Path(reader.path).resolve()), "size": list(reader.level_dimensions[0]),
                  "fingerprint": reader.fingerprint(), "backend": reader.backend,
                  "mpp": list(reader.mpp), "mpp_source": reader.mpp_source, "vendor": reader.vendor},
        "grid": {"level": int(grid.level), "shape": list(grid.shape), "tile_size": grid.config.tile_size,
                 "stride": stride, "mpp": grid.config.mpp,
                 "tile_origin_level0": list(grid.tile_location(0, 0)),
                 "tile_stride_level0": list(_stride_level0(grid, tuple(reader.mpp))),
                 **_tile_size_level0_attrs(grid)},
        "tissue": {"mpp": mask.mpp, "fraction": float(mask.fraction())},
        "edge_tiles": edge_tiles_attrs(grid),
        "model": {"name": resolved.name, "weights_sha256": resolved.weights_sha256,
                  "weights_note": resolved.note, "config": config_identity(resolved.config)},
        "inference": cfg.to_dict(),
        "software": {"wsi_cmaf": __version__},
    }


def edge_tiles_attrs(grid: TileGrid) -> dict[str, Any]:
    """How partial edge tiles were handled (the store's "edge_tiles" attribute)."""
    partial = grid.partial
    return {"policy": "padded", "pad_value": PAD_VALUE, "min_inside_fraction": grid.config.min_inside_fraction,
            "tissue_fraction_of": "inside area", "inside_fraction_array": "wsi_cmaf/inside_fraction",
            "n_partial": int(partial.sum()), "n_partial_tissue": int((partial & grid.tissue).sum()),
            "note": "tiles reaching past the slide's right/bottom edge are analysed with the pixels beyond "
                    "the edge set to pad_value (white); inside_fraction < 1 marks them"}
