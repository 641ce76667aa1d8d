"""Viewer layers for a slide and its heatmap store, in micrometres, without importing napari.

Every layer is a napari "LayerData" tuple ``(data, kwargs, layer_type)``, built from plain
numpy/dask arrays and dicts, so this module (and its geometry) is testable where napari is not
installed; :mod:`wsi_cmaf.viz._napari` and :func:`wsi_cmaf.viz.show` only hand the tuples over.

Coordinates follow the store's OME-NGFF convention: world units are µm from the slide's top-left
corner, and an array element sits at ``index * scale + translate``, i.e. ``translate`` is the
position of the *centre* of element 0. So the slide's level 0 gets ``scale = µm/px`` and
``translate = µm/px / 2``, and the heatmap gets the ``scale`` and ``translation`` of its NGFF
dataset ``0`` (tile stride in µm, centre of tile (0, 0)): a heatmap pixel then covers exactly its
tile's footprint on the slide. napari-ome-zarr keeps only the scale, which shifted the heatmap
half a tile up and left; reading the transforms here avoids that.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from wsi_cmaf.errors import OutputError, WsiCmafError

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]

#: Layer opacity of the heatmap (the colour map's own alpha also rises with probability).
HEATMAP_OPACITY = 0.75
#: Chunk side (px) of the lazy slide arrays: one ``read_region`` call per chunk.
SLIDE_CHUNK = 1024
UNIT = "micrometer"


def _level0_location(px: int, downsample: float) -> int:
    """Smallest level-0 coordinate the backends map to level pixel ``px`` (as grid reads do)."""
    from wsi_cmaf.slide.grid import level0_for_level_px

    return level0_for_level_px(px, downsample)


def slide_levels(reader: Any, chunk: int = SLIDE_CHUNK) -> list[Any]:
    """One lazy dask array (h, w, 3) uint8 per pyramid level of ``reader``, finest first.

    Each chunk is one ``reader.read_region`` call, made only when the viewer shows that part.
    """
    import dask.array as da

    def level_array(level: int) -> Any:
        w, h = reader.level_dimensions[level]
        ds = float(reader.level_downsamples[level])

        def read(block_info: dict | None = None) -> np.ndarray:
            assert block_info is not None  # map_blocks passes it to a function taking the argument
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            loc = (_level0_location(x0, ds), _level0_location(y0, ds))
            return np.asarray(reader.read_region(loc, level, (x1 - x0, y1 - y0)))[..., :3]

        chunks = da.core.normalize_chunks((chunk, chunk, 3), (h, w, 3))
        return da.map_blocks(read, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8),
                             name=f"wsi-cmaf-slide-{reader.path.name}-{level}-{id(reader):x}")

    # napari needs strictly shrinking levels; a pyramid may repeat a size (e.g. DICOM overviews)
    levels, last = [], None
    for level in range(reader.level_count):
        size = tuple(reader.level_dimensions[level])
        if last is None or (size[0] < last[0] and size[1] < last[1]):
            levels.append(level)
            last = size
    return [level_array(level) for level in levels]


def slide_layer(reader: Any, *, mpp: tuple[float, float] | None = None, chunk: int = SLIDE_CHUNK) -> LayerData:
    """The slide as a (multiscale) RGB image layer in µm.

    ``mpp``: level-0 (x, y) µm/px; default ``reader.mpp``. Without either the slide is shown in
    pixels (scale 1) and a warning says that it will not line up with µm layers.
    """
    if mpp is None and getattr(reader, "has_mpp", True):
        mpp = tuple(reader.mpp)
    if mpp is None:
        logger.warning("%s has no µm/px (pass mpp=...): showing it in pixels, not µm", reader.path)
        mx = my = 1.0
    else:
        mx, my = float(mpp[0]), float(mpp[1])
    data = slide_levels(reader, chunk)
    kwargs = {
        "name": Path(reader.path).name,
        "rgb": True,
        "multiscale": len(data) > 1,
        "scale": (my, mx),
        "translate": (my / 2.0, mx / 2.0),  # centre of pixel (0, 0): its edge is at 0 µm
        "metadata": {"wsi_cmaf": {"slide": str(Path(reader.path).absolute()), "mpp": [mx, my],
                                  "units": UNIT if mpp is not None else "pixel"}},
    }
    return (data if len(data) > 1 else data[0]), kwargs, "image"


def ngff_transform(ome: dict[str, Any], path: str = "0") -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) of the spatial (y, x) axes of dataset ``path`` in an NGFF ``ome`` dict.

    Applies the dataset's ``coordinateTransformations`` and the multiscale's own, in order
    (a translation without a scale is 0, a missing scale is 1), as the NGFF spec composes them.
    """
    ms = ome["multiscales"][0]
    names = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
    try:
        iy, ix = names.index("y"), names.index("x")
    except ValueError as exc:
        raise OutputError(f"NGFF multiscale has axes {names}, expected y and x") from exc
    datasets = [d for d in ms["datasets"] if d["path"] == path]
    if not datasets:
        raise OutputError(f"NGFF multiscale has no dataset {path!r}")
    scale, trans = np.ones(len(names)), np.zeros(len(names))
    for t in list(datasets[0]["coordinateTransformations"]) + list(ms.get("coordinateTransformations") or []):
        if t["type"] == "scale":
            s = np.asarray(t["scale"], float)
            scale, trans = scale * s, trans * s
        elif t["type"] == "translation":
            trans = trans + np.asarray(t["translation"], float)
    return (float(scale[iy]), float(scale[ix])), (float(trans[iy]), float(trans[ix]))


def heatmap_colormap() -> dict[str, Any]:
    """The overlay PNG's colour ramp with opacity rising with probability, as a napari colour map.

    Same colours and opacity curve as the overlay PNG (readable over H&E, see
    :mod:`wsi_cmaf.output._draw`); NaN (no tissue / no value) is transparent.
    """
    from wsi_cmaf.output import _draw

    p = np.linspace(0.0, 1.0, 256)
    rgb = _draw.colour_lut(_draw.DEFAULT_CMAP).astype(np.float32) / 255.0
    alpha = _draw.opacity(p, 1.0)
    return {"name": "wsi-cmaf probability", "colors": np.column_stack([rgb, alpha]), "controls": p,
            "interpolation": "linear"}


def heatmap_layers(store: Any, *, classes: list[str | int] | None = None, tissue: bool = True) -> list[LayerData]:
    """Image layers of the store's level-0 probabilities (one per class) and its tissue tiles.

    ``classes``: names or indices to show; default all, with only the model's positive class
    visible. Scale and translate come from the store's NGFF ``coordinateTransformations``.
    """
    import zarr

    from wsi_cmaf.output.geojson import positive_class
    from wsi_cmaf.output.store import HeatmapStore
    from wsi_cmaf.zarr_nodes import attrs_dict, member_group

    store = store if isinstance(store, HeatmapStore) else HeatmapStore.open(store)
    root = zarr.open_group(str(store.path), mode="r", zarr_format=3)
    scale, translate = ngff_transform(dict(attrs_dict(root)["ome"]), "0")
    names = list(store.class_names)
    shown = _class_indices(names, classes)
    positive = positive_class(store)
    probs = store.probabilities(0)
    provenance = {"store": str(Path(store.path).absolute()), "class_names": names,
                  "slide": (store.attrs.get("slide") or {}).get("path"),
                  "model": (store.attrs.get("model") or {}).get("name")}
    layers: list[LayerData] = []
    for k in shown:
        kwargs = {
            "name": f"{names[k]} probability", "scale": scale, "translate": translate,
            "colormap": heatmap_colormap(), "contrast_limits": (0.0, 1.0), "opacity": HEATMAP_OPACITY,
            "blending": "translucent", "interpolation2d": "nearest",
            "visible": k == positive or len(shown) == 1,
            "metadata": {"wsi_cmaf": {**provenance, "class": names[k], "class_index": k}},
        }
        layers.append((probs[k], kwargs, "image"))
    if tissue:
        t_scale, t_translate = ngff_transform(dict(attrs_dict(member_group(root, "labels/tissue"))["ome"]), "0")
        layers.insert(0, (store.tissue(0).astype(np.uint8),
                          {"name": "tissue tiles", "scale": t_scale, "translate": t_translate,
                           "opacity": 0.3, "visible": False, "metadata": {"wsi_cmaf": provenance}},
                          "labels"))
    return layers


def _class_indices(names: list[str], classes: list[str | int] | None) -> list[int]:
    if classes is None:
        return list(range(len(names)))
    out = []
    for c in classes:
        if isinstance(c, str):
            if c not in names:
                raise OutputError(f"class {c!r} is not in the store's classes {names}")
            out.append(names.index(c))
        elif -len(names) <= int(c) < len(names):
            out.append(int(c) % len(names))
        else:
            raise OutputError(f"class index {c} out of range for classes {names}")
    return out


def open_slide_for_store(store: Any, slide: str | Path | None = None) -> Any | None:
    """A reader for ``slide`` (default: the absolute path the store recorded), with the µm/px
    the analysis used when it came from an override; None (logged) when it cannot be opened."""
    from wsi_cmaf.slide.reader import open_slide

    src = store.attrs.get("slide") or {}
    path = slide if slide is not None else src.get("path")
    if path is None:
        logger.warning("%s records no slide path: showing the heatmap alone", store.path)
        return None
    if slide is None and not Path(path).exists():
        logger.warning("%s: the analysed slide %s is not there any more: showing the heatmap alone",
                       store.path, path)
        return None
    kwargs: dict[str, Any] = {}
    if src.get("mpp_source") in ("override", "estimated from nuclei") and src.get("mpp"):
        kwargs["mpp"] = tuple(src["mpp"])  # the slide has no µm/px of its own
    try:
        return open_slide(path, **kwargs)
    except WsiCmafError as exc:
        if slide is not None:
            raise  # asked for explicitly: say why it failed
        logger.warning("%s: cannot open the analysed slide %s (%s): showing the heatmap alone",
                       store.path, path, exc)
        return None


def check_pairing(reader: Any, store: Any) -> None:
    """Warn when ``reader`` is not the slide ``store`` was made from, or differs in µm/px."""
    expected = store.identity.get("slide_fingerprint") or (store.attrs.get("slide") or {}).get("fingerprint")
    if expected:
        from wsi_cmaf.slide.reader import file_fingerprint

        try:
            actual = file_fingerprint(reader.path)
        except (OSError, WsiCmafError):
            actual = None
        if actual is not None and actual != expected:
            logger.warning("%s was not made from %s (different file fingerprint): the overlay may not match",
                           store.path, reader.path)
    recorded = store.geometry.slide_mpp
    if (recorded and getattr(reader, "has_mpp", True)
            and not all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(reader.mpp, recorded))):
            logger.warning("%s: slide µm/px %s differs from the %s the heatmap was made with",
                           reader.path, tuple(reader.mpp), tuple(recorded))


def layer_data(slide: Any = None, store: Any = None, *, mpp: tuple[float, float] | float | None = None,
               classes: list[str | int] | None = None) -> list[LayerData]:
    """Layers for a slide, a heatmap store, or both overlaid (slide first, heatmaps on top).

    ``slide``: a path or an open :class:`~wsi_cmaf.slide.reader.SlideReader`; with only a store
    the slide is the one the store recorded, when it still exists. ``mpp`` overrides the slide's
    level-0 µm/px (one value or (x, y)). Raises :class:`OutputError` when neither is given.
    """
    from wsi_cmaf.output.store import HeatmapStore

    if slide is None and store is None:
        raise OutputError("nothing to show: give a slide, a heatmap store, or both")
    if mpp is not None and not isinstance(mpp, tuple | list | np.ndarray):  # one value: square pixels
        mpp = (float(mpp), float(mpp))
    hm = None if store is None else (store if isinstance(store, HeatmapStore) else HeatmapStore.open(store))
    reader = slide
    if slide is None or isinstance(slide, (str, Path)):
        if hm is not None:
            reader = open_slide_for_store(hm, slide)
        elif slide is not None:  # always, without a store (checked above)
            from wsi_cmaf.slide.reader import open_slide

            reader = open_slide(slide, mpp=mpp)
    layers: list[LayerData] = []
    if reader is not None:
        if hm is not None:
            check_pairing(reader, hm)
        if mpp is None and hm is not None and not getattr(reader, "has_mpp", True) and hm.geometry.slide_mpp:
            mpp = hm.geometry.slide_mpp  # the analysis knew the µm/px: draw the slide with it
        layers.append(slide_layer(reader, mpp=mpp))
    if hm is not None:
        layers.extend(heatmap_layers(hm, classes=classes))
    return layers
