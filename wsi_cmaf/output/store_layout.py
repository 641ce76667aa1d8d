"""The on-disk format of a heatmap store: one Zarr v3 store per slide, an OME-Zarr (NGFF 0.5)
pyramid of class probabilities, and the functions that create, recognise and remove one.

Layout (``<slide>.zarr``)::

    zarr.json            attributes: "ome" (multiscales, omero) and "wsi_cmaf" (identity, provenance)
    0, 1, 2 ...          float32 (C, rows, cols) probabilities; level 0 = one pixel per tile,
                         chunk (C, K, K) = one inference block; NaN = no tissue tile / not computed
    labels/tissue/0 ...  uint8 (1, rows, cols) tissue mask as an NGFF label image
    wsi_cmaf/done        bool (block rows, block cols), chunk (1, 1): block written
    wsi_cmaf/failed      bool, same: block failed (messages in the group's "errors" attribute)
    wsi_cmaf/failed_tiles  bool (rows, cols), chunk (K, K): tissue tiles that could not be decoded
                         (NaN in ``0``; one message per block in the "tile_errors" attribute)
    tasks/<task>/0, 1 .. a multi-task model's other tasks, one NGFF image group each, laid out as
                         ``0, 1, 2 ...`` (see task_groups.py); the main image is the first task
    embeddings           optional float16 (rows, cols, D) tile embeddings (InferenceConfig.embeddings),
                         chunk (K, K, D) = one inference block; NaN where no value
    wsi_cmaf/manifest    int64 (block rows, block cols, F), chunk (1, 1, F): what each written block
                         holds (tile count, CRC-32 and stored size of its data chunks), checked on
                         resume and by ``wsi-cmaf verify`` (store_verify.py)
    wsi_cmaf/inside_fraction  float32 (rows, cols): share of each tile inside the slide; < 1 marks a
                         partial edge tile, padded with white (the "edge_tiles" attribute says how);
                         1 until the tissue stage writes it
    wsi_cmaf/tissue_fraction  float32 (rows, cols): tissue area fraction of each tile (NaN until written)
    wsi_cmaf/tissue_mask, overlay_background   the tissue stage's other outputs, and
                         the group's "inputs" attribute (tissue facts, stain fit): a resumed run
                         reuses them instead of recomputing them

Every block owns exactly one chunk of ``0``, ``done``, ``failed`` and ``failed_tiles``, so blocks
written by different threads never share a chunk: no locks, no read-modify-write of stored data.
:class:`~wsi_cmaf.output.store.HeatmapStore` reads and writes a store of this layout.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_cmaf.errors import OutputError, StoreFormatError, StoreMismatchError
from wsi_cmaf.output._json import json_diff, jsonable
from wsi_cmaf.output.codecs import heatmap_compressors
from wsi_cmaf.output.geometry import TileGeometry
from wsi_cmaf.output.ngff import AXES, image_metadata, label_image_metadata, labels_group_metadata
from wsi_cmaf.output.pyramid import drop_levels, max_pool2, write_nan_mean_levels
from wsi_cmaf.output.store_verify import create_manifest
from wsi_cmaf.output.task_groups import check_task_layout, create_task_groups, finalize_task_groups, task_group_path
from wsi_cmaf.zarr_nodes import attrs_dict, member_array, member_group, read

logger = logging.getLogger("wsi_cmaf.output.store")  # the store's messages keep the store's logger name

FORMAT = "wsi-cmaf-heatmap"
FORMAT_VERSION = 2
META = "wsi_cmaf"  # root attribute key and name of the bookkeeping group
#: sub-folder of a store holding encoders' embedding stores (wsi_cmaf.encoders.embed)
ENCODERS_GROUP = "encoders"
RESERVED = {"format", "format_version", "layout", "identity", "geometry", "layout_complete", "finalized"}


def read_store_meta(path: Path) -> dict[str, Any] | None:
    """The ``wsi_cmaf`` root attributes if ``path`` is a wsi-cmaf store, else None (never raises)."""
    try:
        doc = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    meta = (doc.get("attributes") or {}).get(META) if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def check_format_version(path: Path, meta: dict[str, Any]) -> None:
    """Raise :class:`StoreFormatError` unless ``meta`` (a store's ``wsi_cmaf`` attributes) is of
    the current :data:`FORMAT_VERSION`; only an overwrite can reuse such a store's location."""
    version = meta.get("format_version")
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        origin = f"a newer wsi-cmaf (store format {version})"
    else:
        origin = f"an older wsi-cmaf (store format {'unversioned' if version is None else repr(version)})"
    raise StoreFormatError(f"{path} was written by {origin}; this wsi-cmaf reads store format {FORMAT_VERSION} "
                           "only. Re-run the analysis with overwrite=True (CLI: --overwrite) to replace it")


def make_layout(grid_shape: tuple[int, int], chunk: tuple[int, int], class_names: list[str],
                um_per_tile: tuple[float, float], embedding_dim: int | None = None,
                tasks: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The ``layout`` attribute of a store of these dimensions (ValueError when they cannot be one).

    ``embedding_dim`` is null for a store without embeddings, ``tasks`` empty for a single-task model.
    """
    layout = jsonable({"grid_shape": [int(v) for v in grid_shape], "chunk": [int(v) for v in chunk],
                       "class_names": list(class_names), "um_per_tile": [float(v) for v in um_per_tile]})
    layout["embedding_dim"] = int(embedding_dim) if embedding_dim else None
    task_layout = check_task_layout(tasks) or {}
    if task_layout and next(iter(task_layout.values())) != list(class_names):
        raise ValueError(f"the first task's classes {next(iter(task_layout.values()))} must be "
                         f"the store's class_names {list(class_names)}")
    layout["tasks"] = task_layout
    if min(layout["chunk"]) < 1 or min(layout["grid_shape"]) < 0 or not class_names:
        raise ValueError(f"bad store layout {layout}")
    return layout


def check_attrs(attrs: dict[str, Any], what: str = "attrs") -> dict[str, Any]:
    """``attrs`` made JSON-able; ValueError when it uses a key the store keeps for itself."""
    clash = RESERVED & set(attrs)
    if clash:
        raise ValueError(f"{what} may not use the reserved keys {sorted(clash)}")
    return jsonable(attrs)


def create_store(path: Path, layout: dict[str, Any], identity: dict[str, Any], attrs: dict[str, Any]) -> zarr.Group:
    """Create the store's arrays at ``path`` and return its root group, marked complete last."""
    c, (rows, cols), (k0, k1) = len(layout["class_names"]), layout["grid_shape"], layout["chunk"]
    geometry = TileGeometry.from_attrs(attrs, tuple(layout["um_per_tile"]))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout, "identity": identity,
            "geometry": geometry.to_dict(), "layout_complete": False, "finalized": False, **attrs}
    # The marker goes in first: an interrupted creation leaves a folder we recognise as ours.
    root = zarr.create_group(str(path), zarr_format=3, attributes={META: meta})
    root.create_array("0", shape=(c, rows, cols), chunks=(c, k0, k1), dtype="float32",
                      fill_value=np.nan, compressors=heatmap_compressors(), dimension_names=AXES)
    labels = root.create_group("labels", attributes={"ome": labels_group_metadata(["tissue"])})
    tissue = labels.create_group("tissue", attributes={"ome": label_image_metadata("tissue", 1, geometry.pyramid())})
    tissue.create_array("0", shape=(1, rows, cols), chunks=(1, k0, k1), dtype="uint8", fill_value=0,
                        compressors=heatmap_compressors(), dimension_names=AXES)
    group = root.create_group(META, attributes={"errors": {}})
    nb = (-(-rows // k0), -(-cols // k1))
    for name in ("done", "failed"):
        group.create_array(name, shape=nb, chunks=(1, 1), dtype="bool", fill_value=False,
                           dimension_names=("block_y", "block_x"))
    group.create_array("failed_tiles", shape=(rows, cols), chunks=(k0, k1), dtype="bool", fill_value=False,
                       compressors=heatmap_compressors(), dimension_names=("y", "x"))
    if layout["embedding_dim"]:
        # float16: embeddings are compared by similarity and pooled, not read to 7 digits; half
        # the bytes of float32, which matters at D ~ 500 per tile
        dim = int(layout["embedding_dim"])
        root.create_array("embeddings", shape=(rows, cols, dim), chunks=(k0, k1, dim), dtype="float16",
                          fill_value=np.nan, compressors=heatmap_compressors(), dimension_names=("y", "x", "feature"))
    if layout["tasks"]:
        create_task_groups(root, layout["tasks"], (rows, cols), (k0, k1), geometry.pyramid())
    # the tissue stage's per-tile arrays exist from the start: unknown fractions, whole tiles
    for name, fill in (("tissue_fraction", np.nan), ("inside_fraction", 1.0)):
        group.create_array(name, shape=(rows, cols), chunks=(max(1, min(rows, 2048)), max(1, min(cols, 2048))),
                           dtype="float32", fill_value=fill, compressors=heatmap_compressors(),
                           dimension_names=("y", "x"))
    create_manifest(group, nb, [name for name, _ in data_arrays(root, layout)])
    meta["layout_complete"] = True
    root.attrs.update({"ome": image_metadata(layout["class_names"], 1, geometry.pyramid()), META: meta})
    logger.info("%s: created heatmap store %s, %d×%d blocks", path, (c, rows, cols), *nb)
    return root


def data_arrays(root: zarr.Group, layout: dict[str, Any]) -> list[tuple[str, Any]]:
    """(path in the store, zarr array) of every data array a block owns one chunk of: level 0,
    each extra task's level 0, the embeddings."""
    paths = ["0", *(f"{task_group_path(t)}/0" for t in list(layout["tasks"])[1:])]
    paths += ["embeddings"] if layout["embedding_dim"] else []
    return [(p, member_array(root, p)) for p in paths]


def write_pyramid(root: zarr.Group, levels: int, chunk: tuple[int, int], pyramid: Any, class_names: list[str],
                  tasks: dict[str, list[str]]) -> None:
    """Levels 1 .. ``levels - 1`` of the probabilities (2×2 NaN-mean), of the tissue label (2×2
    max) and of every extra task, rebuilt from level 0, with their NGFF metadata."""
    # One pixel per tile: even a 10 cm slide at 50 µm tiles is 2000², a few MB per class.
    tissue = read(member_array(root, "labels/tissue/0"))
    tissue_group = member_group(root, "labels/tissue")
    k0, k1 = chunk
    write_nan_mean_levels(root, read(member_array(root, "0")), levels, chunk, compressors=heatmap_compressors(),
                          dimension_names=AXES, first=1)
    for level in range(1, levels):
        tissue = max_pool2(tissue)
        h, w = tissue.shape[-2:]
        tarr = tissue_group.create_array(str(level), shape=tissue.shape,
                                         chunks=(1, max(1, min(k0, h)), max(1, min(k1, w))),
                                         dtype="uint8", fill_value=0, compressors=heatmap_compressors(),
                                         dimension_names=AXES, overwrite=True)
        tarr[...] = tissue
    for group in (root, tissue_group):  # levels left over from an earlier, deeper finalize
        drop_levels(group, levels)
    finalize_task_groups(root, tasks, levels, chunk, pyramid)
    tissue_group.attrs["ome"] = label_image_metadata("tissue", levels, pyramid)
    root.attrs["ome"] = image_metadata(class_names, levels, pyramid)


def existing_meta(path: Path) -> dict[str, Any]:
    """The ``wsi_cmaf`` attributes of the finished-creating store at ``path``; :class:`OutputError`
    when it is no store or an incomplete one, :class:`StoreFormatError` for another format version."""
    meta = read_store_meta(path) if path.is_dir() else None
    if meta is None:
        raise OutputError(f"{path} is not a wsi-cmaf heatmap store")
    if not meta.get("layout_complete"):
        raise OutputError(f"{path} is an incomplete store (its creation was interrupted)")
    check_format_version(path, meta)
    return meta


def prepare_location(path: Path, layout: dict[str, Any], identity: dict[str, Any], *,
                     overwrite: bool) -> dict[str, Any] | None:
    """Make ``path`` ready for a store of ``layout`` and ``identity``: the attributes of the store
    there when it can be resumed, or None when a new one is to be created (after removing a store
    that is replaced or whose creation was interrupted).

    Anything at ``path`` other than a wsi-cmaf store (or a folder holding only encoders' embedding
    stores) is an :class:`OutputError` and left untouched; a store of another format version is a
    :class:`StoreFormatError`, and one made with another layout or identity a :class:`StoreMismatchError`.
    """
    if not (path.exists() or path.is_symlink()):
        return None
    meta = read_store_meta(path) if path.is_dir() else None
    if meta is None:
        # a folder holding only encoders' embedding stores (wsi-cmaf embed) takes the heatmap too
        if path.is_dir() and not path.is_symlink() and all(p.name == ENCODERS_GROUP for p in path.iterdir()):
            return None
        raise OutputError(f"{path} exists and is not a wsi-cmaf heatmap store; "
                          "refusing to write there (choose another output location)")
    if overwrite or not meta.get("layout_complete"):
        if not meta.get("layout_complete"):
            logger.warning("%s: incomplete store from an interrupted creation; recreating", path)
        remove_store(path)
        return None
    check_format_version(path, meta)
    problems = json_diff(meta.get("layout"), layout, "layout") + json_diff(meta.get("identity"), identity, "identity")
    if problems:
        raise StoreMismatchError(
            f"{path} holds a result made with different inputs; refusing to mix them "
            f"(use overwrite or another output folder): " + "; ".join(problems[:8])
            + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""))
    return meta


def put_meta_array(group: zarr.Group, name: str, data: np.ndarray, shape: tuple | None, attrs: dict | None = None,
                   dims: tuple[str, ...] = ("y", "x")) -> None:
    """Store ``data`` as array ``name`` of the bookkeeping ``group``, replacing an earlier one;
    ValueError when ``shape`` (the grid's, for per-tile arrays) is given and differs."""
    if shape is not None and data.shape != tuple(shape):
        raise ValueError(f"{name} has shape {data.shape}, grid is {tuple(shape)}")
    chunks = tuple(max(1, min(n, 2048)) for n in data.shape)  # whole small arrays; large masks in tiles
    arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                             compressors=heatmap_compressors(), overwrite=True,
                             dimension_names=dims, attributes=attrs or {})
    arr[...] = data


def block_messages(group: zarr.Group, key: str) -> dict[tuple[int, int], str]:
    """The per-block messages of attribute ``key`` ("errors", "tile_errors") by block index."""
    out: dict[tuple[int, int], str] = {}
    for k, msg in attrs_dict(group).get(key, {}).items():
        by, bx = k.split(",")
        out[int(by), int(bx)] = msg
    return out


def set_block_message(group: zarr.Group, by: int, bx: int, message: str | None, key: str) -> None:
    """Record (None: clear) block ``(by, bx)``'s message in attribute ``key``; the caller
    serialises updates, since the attributes are one JSON document."""
    messages = dict(attrs_dict(group).get(key, {}))
    if message is None and f"{by},{bx}" not in messages:
        return
    if message is None:
        messages.pop(f"{by},{bx}")
    else:
        messages[f"{by},{bx}"] = message
    group.attrs[key] = messages


def remove_store(path: Path) -> None:
    """Delete a directory that :func:`read_store_meta` recognised as a wsi-cmaf store."""
    if path.is_symlink() or read_store_meta(path) is None:
        raise OutputError(f"{path} is not a wsi-cmaf store folder; refusing to delete it")
    logger.info("%s: removing the existing store (overwrite)", path)
    if (path / ENCODERS_GROUP).is_dir():  # other runs' embeddings (wsi-cmaf embed) are not this store's to delete
        for child in path.iterdir():
            if child.name != ENCODERS_GROUP:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return
    shutil.rmtree(path)
