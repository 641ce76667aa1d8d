"""Regions above a probability threshold as a QuPath-compatible GeoJSON FeatureCollection.

A region is a 4-connected set of tiles whose probability is >= ``threshold`` (tiles
without a value — no tissue, failed block — count as below). Each region becomes one
Feature in level-0 slide pixels whose geometry is the union of its tiles (shapely/GEOS):
valid for JTS (QuPath) and shapely, every enclosed below-threshold area an interior ring
(a hole); ``fill_holes=True`` drops the holes instead. Exterior rings are
counter-clockwise and holes clockwise in (x, y) as RFC 7946 asks. The region's numbers go
under ``properties.measurements``, the only place QuPath (>= 0.4) reads numbers from.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.affinity
from skimage import measure

from wsi_cmaf.errors import OutputError
from wsi_cmaf.output.geometry import slide_size
from wsi_cmaf.output.provenance import export_provenance
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.store_io import atomic_write_text, is_write_error, write_error

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


def tile_union(image: np.ndarray) -> shapely.Geometry:
    """Valid (Multi)Polygon of the True cells of ``image`` in cell-edge units (x = column, y = row).

    Each row's runs of cells become one box and GEOS unions the boxes, so the result is valid
    by construction: hole cells that touch only at a corner become two holes meeting at a point
    (or a hole touching the shell), never the self-touching ring ("Ring Self-intersection")
    that tracing a contour gives. Collinear vertices are then dropped.
    """
    img = np.asarray(image, bool)
    if not img.any():
        return shapely.Polygon()
    padded = np.pad(img, ((0, 0), (1, 1))).astype(np.int8)
    starts_r, starts_c = np.nonzero(np.diff(padded, axis=1) == 1)
    _, ends_c = np.nonzero(np.diff(padded, axis=1) == -1)  # same row order as the starts
    boxes = shapely.box(starts_c, starts_r, ends_c, starts_r + 1)
    union = shapely.union_all(boxes)
    simpler = shapely.simplify(union, 0.0)  # tolerance 0: removes exactly collinear points only
    geom = simpler if simpler.is_valid and simpler.area == union.area else union
    if not geom.is_valid:  # belt and braces: GEOS unions are valid, but never export an invalid shape
        geom = shapely.make_valid(geom, method="structure")
    return shapely.orient_polygons(geom, exterior_cw=False)


def _polygons(geom: shapely.Geometry) -> list[shapely.Polygon]:
    if isinstance(geom, shapely.Polygon):
        return [] if geom.is_empty else [geom]
    return [g for part in getattr(geom, "geoms", []) for g in _polygons(part)]


def _to_level0(store: HeatmapStore, geom: shapely.Geometry) -> tuple[shapely.Geometry, bool]:
    """``geom`` (cell-edge units) in level-0 pixels, clipped to the slide when its size is known
    (partial edge tiles reach past it); also whether the clip cut anything off."""
    geo = store.geometry

    def to_px(c: np.ndarray) -> np.ndarray:
        x, y = geo.tile_to_level0(c[:, 1] - 0.5, c[:, 0] - 0.5)  # edge e = centre e - 0.5
        return np.column_stack([x, y])

    level0 = shapely.transform(geom, to_px)
    size = slide_size(store.attrs)
    if size is None:
        return level0, False
    bounds = shapely.box(0.0, 0.0, *size)
    if bounds.contains(level0):
        return level0, False
    # intersection (not clip_by_rect, which may return invalid shapes); keep its polygonal part
    clipped = shapely.union_all(_polygons(shapely.intersection(level0, bounds)))
    return shapely.orient_polygons(clipped, exterior_cw=False), True


def _rings(poly: shapely.Polygon, fill_holes: bool) -> list[list[list[float]]]:
    """Rings of a level-0 ``poly`` as [x, y] lists; exterior CCW, holes CW (``poly`` is oriented)."""
    def ring(coords) -> list[list[float]]:
        return [[round(float(a), 2), round(float(b), 2)] for a, b in coords]

    return [ring(poly.exterior.coords)] + ([] if fill_holes else [ring(r.coords) for r in poly.interiors])


def regions_geojson(
    store: HeatmapStore | str | Path,
    *,
    threshold: float = 0.5,
    class_index: int | None = None,
    class_name: str | None = None,
    color: tuple[int, int, int] = DEFAULT_COLOUR,
    min_tiles: int = 1,
    fill_holes: bool = False,
    provenance: dict | None = None,
) -> dict[str, Any]:
    """FeatureCollection of the regions where class ``class_index`` has probability >= ``threshold``.

    Coordinates are level-0 slide pixels; every geometry is valid (shapely/JTS ``is_valid``) and
    clipped to the slide's bounds (partial edge tiles reach past them).
    Each Feature's properties hold QuPath's ``objectType``, ``classification``, ``name`` and
    ``measurements`` (the only numbers QuPath imports): ``probability_mean`` and
    ``probability_max`` over the region's tiles, ``n_tiles``, ``n_holes``, ``area_um2`` and
    ``threshold``; ``metadata`` (strings) has the class index and tile bounding box. Regions
    smaller than ``min_tiles`` tiles are dropped. ``provenance`` goes in the collection's
    ``properties``.
    """
    store = _as_store(store)
    slide_mpp, _ = store.geometry.require_level0()
    if not 0.0 <= threshold <= 1.0:
        raise OutputError(f"threshold must be in [0, 1], got {threshold}")
    k = positive_class(store, class_index)
    name = class_name or store.class_names[k]
    prob = store.probabilities(0)[k]
    above = np.nan_to_num(prob, nan=-1.0) >= threshold
    # 4-connectivity: tiles touching only at a corner are separate regions (a region's tiles
    # share edges, so its union is one polygon)
    labels = measure.label(above, connectivity=1)
    tile_um2 = float(store.um_per_tile[0] * store.um_per_tile[1])
    px_um2 = float(slide_mpp[0] * slide_mpp[1])
    fid_base = store.identity.get("slide_fingerprint") or str(store.path.resolve())
    features = []
    for region in (measure.regionprops(labels) if above.any() else []):
        if region.area < min_tiles:
            continue
        r0, c0, r1, c1 = region.bbox
        geom = shapely.affinity.translate(tile_union(region.image), xoff=c0, yoff=r0)
        geom, clipped = _to_level0(store, geom)
        polys = [_rings(poly, fill_holes) for poly in _polygons(geom)]
        if not polys:
            continue
        n_holes = sum(len(rings) - 1 for rings in polys)
        geometry = ({"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1
                    else {"type": "MultiPolygon", "coordinates": polys})
        values = prob[labels == region.label]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{fid_base}/{k}/{threshold}/{r0},{c0},{region.label}")),
            "geometry": geometry,
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": [int(v) for v in color]},
                "name": f"{name} p>={threshold:g}",
                "isLocked": False,
                "measurements": {
                    "probability_mean": round(float(values.mean()), 6),
                    "probability_max": round(float(values.max()), 6),
                    "n_tiles": int(region.area),
                    "n_holes": n_holes,
                    # clipped regions: the area inside the slide
                    "area_um2": round(float(geom.area) * px_um2 if clipped else float(region.area) * tile_um2, 2),
                    "threshold": float(threshold),
                },
                "metadata": {"class_index": str(k), "bbox_tiles": f"{r0},{c0},{r1},{c1}"},
            },
        })
    logger.info("%s: %d region(s) of %r with p >= %g", store.path.name, len(features), name, threshold)
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {"source": str(store.path.absolute()), "class": name, "threshold": float(threshold),
                       "coordinates": "level-0 slide pixels (x right, y down)",
                       "slide": (store.attrs.get("slide") or {}).get("path"),
                       "provenance": provenance or {}},
    }


def write_geojson(
    store: HeatmapStore | str | Path, out: str | Path, *, threshold: float = 0.5,
    class_index: int | None = None, **kwargs: Any,
) -> Path:
    """Write :func:`regions_geojson` to ``out`` (parents created) and return its path."""
    out = Path(out)
    store = _as_store(store)
    kwargs.setdefault("provenance", export_provenance(store, out))
    collection = regions_geojson(store, threshold=threshold, class_index=class_index, **kwargs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(collection))  # never half a file under its name
    except OSError as exc:
        if is_write_error(exc):
            raise write_error(exc, out) from exc
        raise OutputError(f"cannot write {out}: {exc}") from exc
    return out
