"""Per-tile explanation maps as an optional group of the heatmap store (OME-Zarr, NGFF 0.5).

Layout, one group per map name (``ig``, ``ig_smoothgrad``, ``occlusion``, ``gradcam``)::

    explanations/                 group; "wsi_cmaf": {"maps": [names]}
    explanations/<name>/          group; "wsi_cmaf": method, settings, threshold, tau, provenance
        tiles                     int64 (n, 7): row, col, x, y, w, h (level-0 px), reason (0 top-k, 1 near threshold)
        probability               float32 (n,): the stored probability of the positive class
        saliency/0                float32 (n, S, S), NGFF image with axes (tile, y, x)
        attention/0, gate/0       the same, CMAF-Net only

Why a dense (n, S, S) stack per map kind plus a tile table, not a sparse slide-sized mosaic
(rows·S x cols·S): the stack costs storage in proportion to the n explained tiles, one chunk
per tile, whatever the slide's size; napari opens it as one image with a slider over the tiles,
at the tile's physical µm/px. A mosaic of a 300 x 200 tile slide at S = 64 would be a
19 200 x 12 800 plane that napari loads whole unless it also gets a pyramid, to show 64 tiles.
The ``tiles`` table places every slice on the slide (and on the heatmap through ``row``/``col``).

The group is written beside the store under a temporary name and moved in with one rename, so
an interrupted write never leaves a half group inside the store, and nothing else in the store
is touched; an earlier group of the same name is replaced only once the new one is complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_cmaf.errors import OutputError
from wsi_cmaf.explain.select import TOP_K
from wsi_cmaf.explain.slide import SlideExplanation
from wsi_cmaf.output._json import jsonable
from wsi_cmaf.output.codecs import heatmap_compressors
from wsi_cmaf.output.ngff import NGFF_VERSION
from wsi_cmaf.zarr_nodes import attrs_dict, member_array, member_group, read

logger = logging.getLogger(__name__)

GROUP = "explanations"
TILE_COLUMNS = ("row", "col", "x", "y", "w", "h", "reason")
_TMP_TAG = ".explain-tmp-"


def map_image_metadata(name: str, um_per_px: float, description: str) -> dict[str, Any]:
    """The ``"ome"`` attribute of one (tile, y, x) map stack: a custom ``tile`` axis (NGFF allows
    one custom-typed axis before the space axes) and y/x in micrometres of the tile."""
    return {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": "tile", "type": "tile"},
                     {"name": "y", "type": "space", "unit": "micrometer"},
                     {"name": "x", "type": "space", "unit": "micrometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, float(um_per_px), float(um_per_px)]}]}],
            "metadata": {"description": description},
        }],
    }


_DESCRIPTIONS = {
    "saliency": "attribution of the positive class per model-input pixel (signed; Grad-CAM >= 0)",
    "attention": "CMAF cross-attention each location receives, mean over heads and queries",
    "gate": "CMAF gate, mean over channels: 1 = fused (cross-attended) features, 0 = spatial branch",
}


def _write_group(root: zarr.Group, expl: SlideExplanation, name: str, attrs: dict[str, Any]) -> None:
    comp = heatmap_compressors()  # the heatmap store's own codec settings
    n = len(expl.choice)
    reason = np.array([0 if r == TOP_K else 1 for r in expl.choice.reason], np.int64)
    table = np.column_stack([expl.choice.rows, expl.choice.cols, expl.location, reason]).astype(np.int64)
    root.create_array("tiles", data=table, chunks=table.shape, dimension_names=("tile", "field"),
                      attributes={"columns": list(TILE_COLUMNS), "reason_codes": {"0": "top_k", "1": "near_threshold"}})
    root.create_array("probability", data=expl.choice.probability.astype(np.float32), chunks=(max(n, 1),),
                      dimension_names=("tile",), attributes={"class": expl.class_names[expl.positive_class]})
    h, w = expl.map_size
    maps = {"saliency": expl.saliency[name], "attention": expl.attention, "gate": expl.gate}
    for kind, data in maps.items():
        if data is None:
            continue
        group = root.create_group(kind, attributes={"ome": map_image_metadata(
            f"{name} {kind}", expl.tile_um / w, _DESCRIPTIONS[kind])})
        arr = group.create_array("0", shape=data.shape, chunks=(1, h, w), dtype="float32", fill_value=np.nan,
                                 compressors=comp, dimension_names=("tile", "y", "x"))
        arr[...] = data
    root.attrs.update({"wsi_cmaf": jsonable(attrs)})


def write_explanation_group(expl: SlideExplanation, name: str, attrs: dict[str, Any]) -> Path:
    """Write map ``name`` of ``expl`` as ``explanations/<name>`` into its store; returns its path."""
    store = Path(expl.store)
    target = store / GROUP / name
    tmp = store.parent / f".{store.name}{_TMP_TAG}{name}-{os.getpid()}"
    old = store.parent / f".{store.name}{_TMP_TAG}{name}-{os.getpid()}-old"
    for stale in store.parent.glob(f".{store.name}{_TMP_TAG}{name}-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    try:
        _write_group(zarr.create_group(str(tmp), zarr_format=3), expl, name, attrs)
        parent = zarr.open_group(str(store), mode="r+", zarr_format=3).require_group(GROUP)
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():  # put the previous group back: the store stays as it was
                os.replace(old, target)
            raise
        names = sorted(set(attrs_dict(parent).get("wsi_cmaf", {}).get("maps", [])) | {name})
        parent.attrs["wsi_cmaf"] = {"maps": names}
    except OSError as exc:
        raise OutputError(f"cannot write the explanation maps into {store}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    logger.info("%s: explanation maps written to %s", store.name, target)
    return target


def read_explanation_group(store: str | Path, name: str) -> dict[str, np.ndarray]:
    """The arrays of ``explanations/<name>`` (``tiles``, ``probability``, and each map kind), plus
    ``translate_um`` (n, 2): the slide position (y, x) in µm of the centre of each map's pixel
    (0, 0), and ``scale_um``: µm per map pixel. With these a viewer places map ``i`` on the slide
    (napari: ``scale=(s, s)``, ``translate=translate_um[i]``), the heatmap's NGFF convention."""
    from wsi_cmaf.output.store import HeatmapStore

    root = zarr.open_group(str(Path(store) / GROUP / name), mode="r", zarr_format=3)
    out = {"tiles": read(member_array(root, "tiles")), "probability": read(member_array(root, "probability"))}
    for kind in ("saliency", "attention", "gate"):
        if kind in root:
            out[kind] = read(member_array(root, f"{kind}/0"))
    scale = float(attrs_dict(member_group(root, "saliency"))["ome"]["multiscales"][0]["datasets"][0]
                  ["coordinateTransformations"][0]["scale"][1])
    mx, my = HeatmapStore.open(store).geometry.slide_mpp or (float("nan"),) * 2
    t = out["tiles"]
    out["scale_um"] = np.float64(scale)
    out["translate_um"] = np.column_stack([t[:, 3] * my + scale / 2, t[:, 2] * mx + scale / 2])
    return out
