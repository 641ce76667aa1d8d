"""Per-tile exports of a heatmap store: a pandas tile table, CSV/Parquet, and QuPath tile GeoJSON.

One row (or Feature) per tile: its grid index, its level-0 rectangle, its centre in µm, its
tissue fraction, the share of it inside the slide (partial edge tiles, padded with white beyond
the slide edge, have ``inside_fraction < 1`` and ``partial`` true) and one probability per class.
QuPath reads only ``measurements`` among a Feature's numbers, so the probabilities go there as
``prob_<class>`` (colour by measurement). A multi-task model's other tasks add
``prob_<task>_<class>`` columns / measurements (the primary task keeps ``prob_<class>``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_cmaf.errors import MissingDependencyError, OutputError
from wsi_cmaf.output.geometry import slide_size
from wsi_cmaf.output.provenance import export_provenance
from wsi_cmaf.output.store import HeatmapStore

logger = logging.getLogger(__name__)

FORMATS = ("geojson", "csv", "parquet")
OBJECT_TYPES = ("tile", "detection")


def _as_store(store: HeatmapStore | str | Path) -> HeatmapStore:
    return store if isinstance(store, HeatmapStore) else HeatmapStore.open(store)


def prob_column(class_name: str) -> str:
    """Column / measurement name of a class's probability: ``prob_<class>`` (spaces -> _)."""
    return "prob_" + re.sub(r"\s+", "_", class_name.strip())


def task_prob_column(task: str, class_name: str) -> str:
    """Column of an extra task's class probability: ``prob_<task>_<class>`` (spaces -> _)."""
    return prob_column(f"{task}_{class_name}")


def prob_columns(store: HeatmapStore) -> list[str]:
    """Every probability column of ``store``'s tile table: primary task's, then each extra task's."""
    return ([prob_column(n) for n in store.class_names]
            + [task_prob_column(t, n) for t in store.extra_tasks for n in store.task_class_names(t)])


def tile_table(store: HeatmapStore | str | Path, *, tissue_only: bool = True) -> pd.DataFrame:
    """One row per tile (row-major): ``row, col, x, y, w, h, x_um, y_um, tissue, tissue_fraction,
    inside_fraction, partial, prob_<class>...`` and, for a multi-task store, ``prob_<task>_<class>``
    for every class of every other task.

    ``x, y, w, h`` are the tile's level-0 top-left corner and size in pixels (int64);
    ``x_um, y_um`` its centre in µm (the heatmap's NGFF coordinates); ``tissue_fraction`` the
    share of the tile covered by the tissue mask (of its area inside the slide; NaN where the
    store was given none); ``inside_fraction`` the share of the tile inside the slide and
    ``partial`` whether it reaches past the slide's edge (``w, h`` stay the analysed tile's size;
    a store given no inside fractions holds whole tiles: 1.0 and false).
    Probabilities are NaN where nothing was computed (no tissue, failed block).
    Stores written with the slide QC add ``blurred`` (flagged as out of focus) and ``sharpness``
    (its band ratio, NaN where not measured) before the probabilities.
    ``tissue_only`` keeps the tissue tiles only.
    """
    store = _as_store(store)
    geo = store.geometry
    _, stride = geo.require_level0()
    rows, cols = store.grid_shape
    rr, cc = np.divmod(np.arange(rows * cols, dtype=np.int64), max(cols, 1))
    tissue = store.tissue(0).ravel()
    keep = tissue if tissue_only else np.ones(rr.shape, bool)
    rr, cc = rr[keep], cc[keep]
    sx, sy = stride
    tx, ty = geo.tile_level0 or stride
    ox, oy = geo.origin_level0
    pyr = geo.pyramid()
    uy, ux = store.um_per_tile
    fraction = store.tissue_fraction().ravel().astype(np.float64)
    inside = store.inside_fraction().ravel().astype(np.float64)
    data: dict[str, Any] = {
        "row": rr, "col": cc,
        "x": np.round(ox + cc * sx).astype(np.int64), "y": np.round(oy + rr * sy).astype(np.int64),
        "w": np.full(rr.shape, int(round(tx)), np.int64), "h": np.full(rr.shape, int(round(ty)), np.int64),
        "x_um": pyr.centre_um[1] + cc * ux, "y_um": pyr.centre_um[0] + rr * uy,
        "tissue": tissue[keep],
        "tissue_fraction": fraction[keep],
        "inside_fraction": inside[keep], "partial": inside[keep] < 1.0,
    }
    from wsi_cmaf.qc.report import read_store as read_qc

    qc = read_qc(store)  # stores written with the slide QC: out-of-focus flag and sharpness per tile
    if qc is not None and qc.get("blur") is not None and qc["blur"].shape == (rows, cols):
        data["blurred"] = qc["blur"].ravel()[keep].astype(bool)
        data["sharpness"] = qc["sharpness"].ravel()[keep].astype(np.float64)
    probs = store.probabilities(0)
    for k, name in enumerate(store.class_names):
        data[prob_column(name)] = probs[k].ravel()[keep].astype(np.float64)
    for task in store.extra_tasks:
        task_probs = store.probabilities(0, task)
        for k, name in enumerate(store.task_class_names(task)):
            data[task_prob_column(task, name)] = task_probs[k].ravel()[keep].astype(np.float64)
    frame = pd.DataFrame(data)
    frame.attrs["store"] = str(store.path.absolute())
    frame.attrs["classes"] = list(store.class_names)
    if store.tasks:
        frame.attrs["tasks"] = {t: list(c) for t, c in store.tasks.items()}
    return frame


def tiles_geojson(store: HeatmapStore | str | Path, *, object_type: str = "tile",
                  provenance: dict | None = None) -> dict[str, Any]:
    """QuPath FeatureCollection: one ``tile`` (or ``detection``) object per tissue tile with values.

    Geometry: the tile's level-0 rectangle (counter-clockwise ring), clipped to the slide for
    partial edge tiles. ``measurements`` holds ``prob_<class>`` for every class,
    ``tissue_fraction``, ``inside_fraction`` (< 1: a partial edge tile, padded beyond the slide),
    ``row`` and ``col``.
    """
    if object_type not in OBJECT_TYPES:
        raise OutputError(f"object type must be one of {OBJECT_TYPES}, got {object_type!r}")
    store = _as_store(store)
    frame = tile_table(store)
    primary = [prob_column(n) for n in store.class_names]
    prob_cols = prob_columns(store)
    frame = frame[np.isfinite(frame[primary].to_numpy()).all(axis=1)]
    base = store.identity.get("slide_fingerprint") or str(store.path.absolute())
    features = []
    size = slide_size(store.attrs)
    right, bottom = size if size is not None else (np.inf, np.inf)
    values = frame[["row", "col", "x", "y", "w", "h", "tissue_fraction", "inside_fraction", *prob_cols]
                   ].to_numpy(np.float64)
    for row, col, x, y, w, h, frac, inside, *ps in values:
        x1, y1 = min(x + w, right), min(y + h, bottom)  # nothing drawn beyond the slide
        measurements = {name: round(float(p), 6) for name, p in zip(prob_cols, ps)}
        if np.isfinite(frac):
            measurements["tissue_fraction"] = round(float(frac), 4)
        measurements.update(inside_fraction=round(float(inside), 4), row=int(row), col=int(col))
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{base}/tile/{int(row)},{int(col)}")),
            # counter-clockwise in (x, y) as RFC 7946 asks (positive shoelace area)
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": {"objectType": object_type, "isLocked": True, "measurements": measurements},
        })
    return {"type": "FeatureCollection", "features": features,
            "properties": {"coordinates": "level-0 slide pixels (x right, y down)",
                           "classes": list(store.class_names), "provenance": provenance or {}}}


def _require_pyarrow() -> None:
    if importlib.util.find_spec("pyarrow") is None:
        raise MissingDependencyError(
            "Parquet export needs pyarrow, which is not installed: pip install pyarrow "
            "(or pip install 'wsi-cmaf[parquet]'), or use --format csv")


def write_tiles(store: HeatmapStore | str | Path, out: str | Path, fmt: str | None = None, *,
                object_type: str = "tile", call: str | None = None) -> Path:
    """Write the per-tile export of ``store`` to ``out`` as ``fmt`` (default: from the suffix).

    GeoJSON: :func:`tiles_geojson` with provenance in the collection's properties. CSV: the
    :func:`tile_table`. Parquet: the same table (needs pyarrow), provenance in the file's
    schema metadata under ``wsi_cmaf:provenance``.
    """
    out = Path(out)
    fmt = (fmt or out.suffix.lstrip(".")).lower()
    if fmt == "json":
        fmt = "geojson"
    if fmt not in FORMATS:
        raise OutputError(f"unknown tile export format {fmt!r} for {out}: use one of {FORMATS}")
    if fmt == "parquet":
        _require_pyarrow()
    store = _as_store(store)
    prov = export_provenance(store, out, call=call)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "geojson":
            out.write_text(json.dumps(tiles_geojson(store, object_type=object_type, provenance=prov)))
        elif fmt == "csv":
            tile_table(store).to_csv(out, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(tile_table(store), preserve_index=False)
            meta = dict(table.schema.metadata or {})
            meta[b"wsi_cmaf:provenance"] = json.dumps(prov).encode()
            pq.write_table(table.replace_schema_metadata(meta), out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc}") from exc
    logger.info("%s: tile export written to %s", store.path.name, out)
    return out
