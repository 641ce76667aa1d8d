"""Bags of tile embeddings read from heatmap stores, and the MIL attention map written back.

A store made with ``analyze_slide(..., embeddings=True)`` holds ``embeddings`` (rows, cols, D).
:func:`read_embeddings` turns it into a tile table (row, col, µm centre) and an (N, D) matrix;
:func:`write_attention_map` puts a slide head's per-tile attention back into the store as one more
NGFF image (group ``mil_attention``, same grid and µm coordinates as the probabilities), so napari
or any OME-Zarr viewer overlays it on the heatmap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from wsi_cmaf.errors import DataError
from wsi_cmaf.output.codecs import heatmap_compressors
from wsi_cmaf.output.ngff import AXES, NGFF_VERSION, multiscales_metadata
from wsi_cmaf.output.pyramid import write_nan_mean_levels
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.zarr_nodes import member_array, read

logger = logging.getLogger(__name__)

ATTENTION_GROUP = "mil_attention"


def _open(store: HeatmapStore | str | Path) -> HeatmapStore:
    return store if isinstance(store, HeatmapStore) else HeatmapStore.open(store)


def read_embeddings(store: HeatmapStore | str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """``(tiles, X)``: one row per tissue tile that has an embedding (row-major order).

    ``tiles`` has ``row, col`` (grid indices) and ``x_um, y_um`` (tile centre in the heatmap's
    NGFF µm coordinates); ``X`` is float32 (N, D). Tiles without a value (no tissue, undecodable,
    block not computed) are left out. Raises :class:`DataError` when the store has no embeddings.
    """
    st = _open(store)
    emb = st.embeddings()
    if emb is None:
        raise DataError(f"{st.path} holds no tile embeddings; rerun `wsi-cmaf analyze --embeddings` "
                        "(or analyze_slide(..., embeddings=True)) into a new output folder")
    ok = np.isfinite(emb).all(axis=2) & st.tissue(0)
    rows, cols = np.nonzero(ok)
    pyr = st.geometry.pyramid()
    uy, ux = st.um_per_tile
    tiles = pd.DataFrame({"row": rows.astype(np.int64), "col": cols.astype(np.int64),
                          "x_um": pyr.centre_um[1] + cols * ux, "y_um": pyr.centre_um[0] + rows * uy})
    tiles.attrs["store"] = str(st.path)
    return tiles, emb[rows, cols].astype(np.float32)


def write_attention_map(store: HeatmapStore | str | Path, rows: np.ndarray, cols: np.ndarray,
                        weights: np.ndarray, *, levels: int = 3, attrs: dict | None = None) -> Path:
    """Write per-tile attention as NGFF image group ``mil_attention`` inside the store.

    Channels: ``attention`` (the weights as given, summing to 1 over the slide's tiles) and
    ``attention_relative`` (weights / max, in [0, 1], what a viewer shows with the probability
    window). NaN where no tile. Pyramid levels 1.. are 2x2 NaN means, as for the probabilities.
    Replaces an earlier map. Returns the group's path.
    """
    st = _open(store)
    weights = np.asarray(weights, dtype=np.float32)
    if not (len(rows) == len(cols) == len(weights)):
        raise ValueError(f"rows, cols and weights differ in length: {len(rows)}, {len(cols)}, {len(weights)}")
    h, w = st.grid_shape
    img = np.full((2, h, w), np.nan, np.float32)
    img[0, rows, cols] = weights
    img[1, rows, cols] = weights / max(float(weights.max()), 1e-12) if len(weights) else weights
    root = zarr.open_group(str(st.path), mode="r+", zarr_format=3)
    if ATTENTION_GROUP in root:
        del root[ATTENTION_GROUP]
    group = root.create_group(ATTENTION_GROUP)
    write_nan_mean_levels(group, img, levels, st.chunk, compressors=heatmap_compressors(), dimension_names=AXES)
    channels: list[dict[str, Any]] = [
        {"label": name, "active": name == "attention_relative", "color": "FF00FF", "coefficient": 1,
         "family": "linear", "inverted": False, "window": {"min": 0.0, "max": hi, "start": 0.0, "end": hi}}
        for name, hi in (("attention", float(np.nanmax(img[0])) if len(weights) else 1.0), ("attention_relative", 1.0))
    ]
    group.attrs.update({
        "ome": {"version": NGFF_VERSION,
                "multiscales": multiscales_metadata(ATTENTION_GROUP, levels, st.geometry.pyramid(), method="nan_mean",
                                                    description="attention-MIL weights per tile (2x2 NaN mean)"),
                "omero": {"name": ATTENTION_GROUP, "channels": channels,
                          "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0}}},
        "wsi_cmaf": dict(attrs or {}),
    })
    logger.info("%s: wrote MIL attention map (%d tiles)", st.path, len(weights))
    return st.path / ATTENTION_GROUP


def read_attention_map(store: HeatmapStore | str | Path, level: int = 0) -> np.ndarray:
    """float32 (2, rows, cols): the ``attention`` and ``attention_relative`` channels of ``level``."""
    st = _open(store)
    root = zarr.open_group(str(st.path), mode="r", zarr_format=3)
    if f"{ATTENTION_GROUP}/{level}" not in root:
        raise DataError(f"{st.path} has no MIL attention map (run `wsi-cmaf predict-slide` first)")
    return read(member_array(root, f"{ATTENTION_GROUP}/{level}"))
