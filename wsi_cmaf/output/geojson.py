"""Regions above a probability threshold as a QuPath-compatible GeoJSON FeatureCollection.

A region is a 4-connected set of tiles whose probability is >= ``threshold`` (tiles
without a value — no tissue, failed block — count as below). Each region becomes one
``Polygon`` Feature in level-0 slide pixels: the exterior ring traces the union of its
tiles and every enclosed below-threshold area becomes an interior ring (a hole), as
QuPath and shapely expect; ``fill_holes=True`` drops the holes instead. Exterior rings
are counter-clockwise and holes clockwise in (x, y) as RFC 7946 asks.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from skimage import measure

from wsi_cmaf.errors import OutputError
from wsi_cmaf.output.store import HeatmapStore

logger = logging.getLogger(__name__)

DEFAULT_COLOUR = (200, 0, 0)


def _as_store(store: HeatmapStore | str | Path) -> HeatmapStore:
    return store if isinstance(store, HeatmapStore) else HeatmapStore.open(store)


def positive_class(store: HeatmapStore, class_index: int | None = None) -> int:
    """The class to map: ``class_index``, else the model config's ``positive_class``, else the last."""
    n = len(store.class_names)
    if class_index is None:
        cfg = (store.attrs.get("model") or {}).get("config") or {}
        class_index = int(cfg.get("positive_class", n - 1))
    if not -n <= class_index < n:
        raise OutputError(f"class index {class_index} out of range for classes {store.class_names}")
    return class_index % n


def rectilinear(contour: np.ndarray) -> np.ndarray:
    """Turn a marching-squares contour of a 0/1 image into the exact pixel-edge outline.

    On a binary image, ``find_contours(.., 0.5)`` puts every vertex midway between two
    pixel centres and cuts each corner diagonally. Re-inserting the corner (the point
    whose row and column are both half-integers) restores the tile boundary exactly;
    collinear points are then dropped.
    """
    pts = np.round(contour * 2) / 2  # vertices sit on the half-pixel lattice
    out: list[tuple[float, float]] = []
    for (r0, c0), (r1, c1) in zip(pts[:-1], pts[1:]):
        out.append((r0, c0))
        if r0 != r1 and c0 != c1:  # diagonal step: add the corner on the tile boundary
            out.append((r0, c1) if r0 % 1 else (r1, c0))
    out.append(tuple(pts[-1]))
    ring = np.array(out)
    # drop points that lie on a straight line between their neighbours (and duplicates)
    keep = [0]
    for i in range(1, len(ring) - 1):
        a, b, c = ring[keep[-1]], ring[i], ring[i + 1]
        cross = (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0])
        if cross != 0:
            keep.append(i)
    ring = ring[keep + [len(ring) - 1]]
    if len(ring) > 4 and np.array_equal(ring[0], ring[-1]):
        a, b, c = ring[-2], ring[0], ring[1]  # the start point may sit mid-edge: drop it there too
        if (b[0] - a[0]) * (c[1] - b[1]) == (b[1] - a[1]) * (c[0] - b[0]):
            ring = np.vstack([ring[1:-1], ring[1:2]])
    return ring


def _signed_area(x: np.ndarray, y: np.ndarray) -> float:
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _ring(store: HeatmapStore, contour: np.ndarray, ccw: bool) -> list[list[float]]:
    """Contour in padded tile coordinates -> closed level-0 (x, y) ring with the wanted winding."""
    ring = rectilinear(contour) - 1.0  # undo the one-tile padding
    x, y = store.geometry.tile_to_level0(ring[:, 0], ring[:, 1])
    if (_signed_area(x, y) > 0) != ccw:
        x, y = x[::-1], y[::-1]
    return [[round(float(a), 2), round(float(b), 2)] for a, b in zip(x, y)]


def regions_geojson(
    store: HeatmapStore | str | Path,
    *,
    threshold: float = 0.5,
    class_index: int | None = None,
    class_name: str | None = None,
    color: tuple[int, int, int] = DEFAULT_COLOUR,
    min_tiles: int = 1,
    fill_holes: bool = False,
) -> dict[str, Any]:
    """FeatureCollection of the regions where class ``class_index`` has probability >= ``threshold``.

    Coordinates are level-0 slide pixels. Each Feature's properties hold QuPath's
    ``objectType``/``classification`` plus ``probability`` (mean over the region's tiles),
    ``probability_max``, ``n_tiles``, ``area_um2``, and the ``threshold``. Regions smaller
    than ``min_tiles`` tiles are dropped.
    """
    store = _as_store(store)
    store.geometry.require_level0()
    if not 0.0 <= threshold <= 1.0:
        raise OutputError(f"threshold must be in [0, 1], got {threshold}")
    k = positive_class(store, class_index)
    name = class_name or store.class_names[k]
    prob = store.probabilities(0)[k]
    above = np.nan_to_num(prob, nan=-1.0) >= threshold
    # 4-connectivity matches find_contours' default (fully_connected="low"): tiles touching
    # only at a corner are separate regions, so each contour belongs to exactly one region.
    labels = measure.label(above, connectivity=1)
    tile_um2 = float(store.um_per_tile[0] * store.um_per_tile[1])
    fid_base = store.identity.get("slide_fingerprint") or str(store.path.resolve())
    features = []
    for region in (measure.regionprops(labels) if above.any() else []):
        if region.area < min_tiles:
            continue
        r0, c0, r1, c1 = region.bbox
        sub = np.pad(region.image.astype(np.uint8), 1)
        contours = measure.find_contours(sub, 0.5)
        # the exterior is the ring enclosing the largest area; the others are holes
        areas = [abs(_signed_area(c[:, 1], c[:, 0])) for c in contours]
        order = np.argsort(areas)[::-1]
        offset = np.array([r0, c0], dtype=float)
        rings = [_ring(store, contours[order[0]] + offset, ccw=True)]
        if not fill_holes:
            rings += [_ring(store, contours[i] + offset, ccw=False) for i in order[1:]]
        values = prob[labels == region.label]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{fid_base}/{k}/{threshold}/{r0},{c0},{region.label}")),
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": [int(v) for v in color]},
                "name": f"{name} p>={threshold:g}",
                "isLocked": False,
                "probability": round(float(values.mean()), 6),
                "probability_max": round(float(values.max()), 6),
                "n_tiles": int(region.area),
                "n_holes": len(rings) - 1,
                "area_um2": round(float(region.area) * tile_um2, 2),
                "threshold": float(threshold),
                "class_index": k,
                "bbox_tiles": [int(r0), int(c0), int(r1), int(c1)],
            },
        })
    logger.info("%s: %d region(s) of %r with p >= %g", store.path.name, len(features), name, threshold)
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {"source": str(store.path), "class": name, "threshold": float(threshold),
                       "coordinates": "level-0 slide pixels (x right, y down)",
                       "slide": (store.attrs.get("slide") or {}).get("path")},
    }


def write_geojson(
    store: HeatmapStore | str | Path, out: str | Path, *, threshold: float = 0.5,
    class_index: int | None = None, **kwargs: Any,
) -> Path:
    """Write :func:`regions_geojson` to ``out`` (parents created) and return its path."""
    collection = regions_geojson(store, threshold=threshold, class_index=class_index, **kwargs)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(collection))
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc}") from exc
    return out
