"""Exports of stored tile embeddings in the formats the field opens.

* AnnData (``.h5ad`` or ``.zarr``): ``X`` = embeddings (tiles x D, float32), ``obs`` = the tile
  table (grid row/col, level-0 box ``x, y, w, h`` in px, centre ``x_um, y_um``, tissue fraction),
  ``obsm["spatial"]`` = tile centres in level-0 px (what squidpy/LazySlide plot on the slide), and
  the store's identity and provenance in ``uns``.
* TRIDENT / CLAM HDF5: datasets ``features`` (N, D) float32 and ``coords`` (N, 2) int64, the
  level-0 top-left corner ``(x, y)`` of each tile, with the attributes both readers use:
  ``coords.attrs`` ``patch_size``, ``patch_level`` (0), ``custom_downsample``, ``patch_size_level0``,
  ``level0_magnification``,
  ``target_magnification``, ``overlap``, ``name``, ``level0_width``, ``level0_height``, ``savetodir``
  (TRIDENT's ``coords_to_h5`` / ``read_coords``; CLAM's legacy ``patch_size`` / ``patch_level``),
  ``features.attrs`` ``name``, ``encoder``, ``savetodir`` (TRIDENT's feature writer). Existing MIL
  code reads ``f["features"][:]`` and ``f["coords"][:]`` unchanged.

Magnification is derived from µm/px with the usual 10 / µm-per-px convention (0.25 -> 40x).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_cmaf.errors import MissingDependencyError, OutputError
from wsi_cmaf.output.store import HeatmapStore

logger = logging.getLogger(__name__)


def _require(module: str, extra: str = "encoders") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"this export needs {module}: pip install 'wsi-cmaf[{extra}]' "
                                     f"(or pip install {module})") from exc


def embedding_table(store: HeatmapStore | str | Path) -> tuple[pd.DataFrame, np.ndarray, HeatmapStore]:
    """``(tiles, X, store)``: every embedded tissue tile with its level-0 box and µm centre, and
    its float32 embedding (rows in the same order)."""
    from wsi_cmaf.output.tiles import tile_table
    from wsi_cmaf.slidelevel import read_embeddings

    st = store if isinstance(store, HeatmapStore) else HeatmapStore.open(store)
    emb_tiles, x = read_embeddings(st)
    table = tile_table(st, tissue_only=True)
    keep = [c for c in ("row", "col", "x", "y", "w", "h", "tissue_fraction", "inside_fraction", "partial")
            if c in table.columns]
    tiles = emb_tiles.merge(table[keep], on=["row", "col"], how="left", validate="one_to_one")
    if len(tiles) != len(x) or tiles[["x", "y"]].isna().any().any():
        raise OutputError(f"{st.path}: embedded tiles and the tile table disagree ({len(tiles)} vs {len(x)} rows)")
    for c in ("x", "y", "w", "h"):
        tiles[c] = tiles[c].astype(np.int64)
    return tiles, x, st


def _uns(st: HeatmapStore) -> dict[str, Any]:
    """Identity and provenance as JSON strings (AnnData writers keep nested dicts, but some
    readers choke on None and mixed lists inside them)."""
    attrs = st.attrs
    enc = (st.identity.get("model_config") or {}).get("model_kwargs", {}).get("encoder", {})
    return {"wsi_cmaf": {"store": str(st.path), "encoder": json.dumps(enc), "identity": json.dumps(st.identity),
                         "provenance": json.dumps(attrs.get("provenance", {}), default=str),
                         "um_per_tile": list(st.um_per_tile)}}


def export_anndata(store: HeatmapStore | str | Path, out: str | Path) -> Path:
    """Write the store's embeddings as AnnData to ``out`` (``.h5ad``, or ``.zarr`` for a Zarr store)."""
    ad = _require("anndata")
    tiles, x, st = embedding_table(store)
    obs = tiles.copy()
    obs.index = [f"r{r}_c{c}" for r, c in zip(obs["row"], obs["col"])]
    centre = np.stack([obs["x"] + obs["w"] / 2.0, obs["y"] + obs["h"] / 2.0], axis=1).astype(np.float64)
    adata = ad.AnnData(X=x, obs=obs, obsm={"spatial": centre, "spatial_um": obs[["x_um", "y_um"]].to_numpy()},
                       uns=_uns(st))
    adata.var_names = [f"f{i}" for i in range(x.shape[1])]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".zarr":
        adata.write_zarr(str(out))
    else:
        adata.write_h5ad(str(out))
    logger.info("wrote %s: %d tiles x %d features", out, *x.shape)
    return out


def export_h5(store: HeatmapStore | str | Path, out: str | Path, *, name: str | None = None) -> Path:
    """Write the store's embeddings as a TRIDENT/CLAM feature file (see the module docstring)."""
    h5py = _require("h5py")
    tiles, x, st = embedding_table(store)
    slide, grid = st.attrs.get("slide", {}), st.attrs.get("grid", {})
    slide_mpp = float(np.mean(slide.get("mpp") or [np.nan]))
    w0, h0 = (int(v) for v in (slide.get("size") or [0, 0]))
    size0 = int(np.median(tiles["w"])) if len(tiles) else 0
    enc = (st.identity.get("model_config") or {}).get("model_kwargs", {}).get("encoder", {})
    stem = name or Path(slide.get("path") or st.path).stem
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    coords = tiles[["x", "y"]].to_numpy(np.int64).reshape(-1, 2)
    with h5py.File(out, "w") as f:
        dset = f.create_dataset("features", data=x.astype(np.float32))
        dset.attrs.update({"name": stem, "encoder": str(enc.get("name", st.identity.get("model", ""))),
                           "savetodir": str(out.parent)})
        c = f.create_dataset("coords", data=coords)
        tile_px = int(grid.get("tile_size", 0))
        # coords and sizes refer to level 0: patch_size x custom_downsample = the level-0 size, the
        # way CLAM's legacy readers combine them (patch_level 0), and src/target magnification
        # give the same size the way TRIDENT does
        c.attrs.update({"patch_size": tile_px, "patch_level": 0, "patch_size_level0": size0,
                        "custom_downsample": _whole(size0 / tile_px) if tile_px else 1,
                        "level0_magnification": _mag(slide_mpp),
                        "target_magnification": _mag(float(grid.get("mpp", np.nan))),
                        "overlap": 0, "name": stem, "savetodir": str(out.parent),
                        "level0_width": w0, "level0_height": h0})
    logger.info("wrote %s: features %s, coords %s", out, x.shape, coords.shape)
    return out


def _mag(mpp: float) -> float:
    """Nominal objective magnification of a µm/px (10 / mpp): 0.25 -> 40, 0.5 -> 20, 4 -> 2.5."""
    return round(10.0 / mpp, 4) if np.isfinite(mpp) and mpp > 0 else -1.0


def _whole(v: float) -> float | int:
    return int(round(v)) if abs(v - round(v)) < 1e-6 else float(v)
