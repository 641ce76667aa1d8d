"""One Zarr v3 store per slide: an OME-Zarr (NGFF 0.5) pyramid of class probabilities.

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
                         ``0, 1, 2 ...`` (see store_tasks.py); the main image is the first task
    embeddings           optional float16 (rows, cols, D) tile embeddings (InferenceConfig.embeddings),
                         chunk (K, K, D) = one inference block; NaN where no value
    wsi_cmaf/manifest    int64 (block rows, block cols, F), chunk (1, 1, F): what each written block
                         holds (tile count, CRC-32 and stored size of its data chunks), checked on
                         resume and by ``wsi-cmaf verify`` (store_verify.py)
    wsi_cmaf/inside_fraction  float32 (rows, cols): share of each tile inside the slide; < 1 marks a
                         partial edge tile, padded with white (the "edge_tiles" attribute says how)
    wsi_cmaf/tissue_mask, tissue_fraction, overlay_background   the tissue stage's outputs, and
                         the group's "inputs" attribute (tissue facts, stain fit): a resumed run
                         reuses them instead of recomputing them (see store_inputs.py)

Every block owns exactly one chunk of ``0``, ``done``, ``failed`` and ``failed_tiles``, so blocks
written by different threads never share a chunk: no locks, no read-modify-write of stored data.
The per-block flags, failed tiles and their messages are kept by store_blocks.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from wsi_cmaf.errors import OutputError, OutputExistsError, StoreFormatError, StoreMismatchError
from wsi_cmaf.output._json import json_diff, jsonable
from wsi_cmaf.output.geometry import TileGeometry
from wsi_cmaf.output.ngff import AXES, image_metadata, label_image_metadata, labels_group_metadata
from wsi_cmaf.output.pyramid import (  # noqa: F401  (nan_mean_pool2 re-exported)
    drop_levels, max_pool2, nan_mean_pool2, write_nan_mean_levels,
)
from wsi_cmaf.output.store_blocks import BlockStateMixin
from wsi_cmaf.output.store_inputs import RunInputsMixin
from wsi_cmaf.output.store_tasks import TaskGroupsMixin, check_task_layout, task_group_path
from wsi_cmaf.output.store_verify import BlockManifestMixin

logger = logging.getLogger(__name__)

FORMAT = "wsi-cmaf-heatmap"
FORMAT_VERSION = 2
META = "wsi_cmaf"  # root attribute key and name of the bookkeeping group
#: sub-folder of a store holding encoders' embedding stores (wsi_cmaf.encoders.embed)
ENCODERS_GROUP = "encoders"
_RESERVED = {"format", "format_version", "layout", "identity", "geometry", "layout_complete", "finalized"}


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)


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


class HeatmapStore(RunInputsMixin, TaskGroupsMixin, BlockStateMixin, BlockManifestMixin):
    """Writer/reader of one slide's heatmap store (see module docstring for the layout)."""

    def __init__(self, path: Path, root: zarr.Group, *, writable: bool) -> None:
        self.path = Path(path)
        self._root = root
        self._writable = writable
        meta = root.attrs[META]
        layout = meta["layout"]
        self.grid_shape: tuple[int, int] = tuple(layout["grid_shape"])
        self.chunk: tuple[int, int] = tuple(layout["chunk"])
        self.class_names: list[str] = list(layout["class_names"])
        self.um_per_tile: tuple[float, float] = tuple(layout["um_per_tile"])
        self.embedding_dim: int | None = layout.get("embedding_dim")
        #: {task: class names}, primary task (the main image) first; {} for a single-task store
        self.tasks: dict[str, list[str]] = {k: list(v) for k, v in (layout.get("tasks") or {}).items()}
        self._emb = root["embeddings"] if self.embedding_dim else None
        self.identity: dict[str, Any] = meta.get("identity", {})
        self.geometry = TileGeometry.from_dict(meta["geometry"])
        self._meta_group = root[META]
        self._probs = root["0"]
        self._tissue = root["labels/tissue/0"]
        self._done_arr = self._meta_group["done"]
        self._failed_arr = self._meta_group["failed"]
        # Cached flags: the pipeline asks done[b] for every block; one read at open is enough.
        self._done = np.asarray(self._done_arr[...], dtype=bool)
        self._failed = np.asarray(self._failed_arr[...], dtype=bool)
        self._failed_tiles_arr = self._meta_group["failed_tiles"]
        self._failed_tiles = np.asarray(self._failed_tiles_arr[...], dtype=bool)
        self._lock = threading.Lock()  # guards the caches and the "errors" attributes only
        self._open_manifest(writable)  # what each block wrote, for resume and ``verify`` (store_verify.py)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_or_create(
        cls, path: str | Path, *, grid_shape: tuple[int, int], chunk: tuple[int, int],
        class_names: list[str], identity: dict, attrs: dict, um_per_tile: tuple[float, float],
        resume: bool = True, overwrite: bool = False, embedding_dim: int | None = None,
        tasks: dict[str, list[str]] | None = None,
    ) -> "HeatmapStore":
        """Open the store at ``path`` for writing, creating it if needed.

        An existing store is resumed only if ``identity`` (slide fingerprint, model, weights,
        configs) and the layout match (else :class:`StoreMismatchError` naming what differs; a store
        of another format version raises :class:`StoreFormatError`)
        and ``resume`` is true (else :class:`OutputExistsError`). ``overwrite`` replaces an
        existing *wsi-cmaf store* only; any other existing file or non-empty folder raises
        :class:`OutputError` and is left untouched. ``embedding_dim`` adds the ``embeddings`` array;
        it is part of the layout, so a store is never resumed with and without embeddings.
        ``tasks`` ({task: class names}, primary first; its first entry must be ``class_names``)
        adds one ``tasks/<task>`` image group per task after the first (store_tasks.py).
        """
        path = Path(path)
        layout = jsonable({"grid_shape": [int(v) for v in grid_shape], "chunk": [int(v) for v in chunk],
                           "class_names": list(class_names), "um_per_tile": [float(v) for v in um_per_tile]})
        if embedding_dim:  # absent otherwise: stores without embeddings keep their old layout
            layout["embedding_dim"] = int(embedding_dim)
        task_layout = check_task_layout(tasks)
        if task_layout:  # absent for single-task models: their layout stays the old one
            if next(iter(task_layout.values())) != list(class_names):
                raise ValueError(f"the first task's classes {next(iter(task_layout.values()))} must be "
                                 f"the store's class_names {list(class_names)}")
            layout["tasks"] = task_layout
        clash = _RESERVED & set(attrs)
        if clash:
            raise ValueError(f"attrs may not use the reserved keys {sorted(clash)}")
        if min(layout["chunk"]) < 1 or min(layout["grid_shape"]) < 0 or not class_names:
            raise ValueError(f"bad store layout {layout}")
        identity = jsonable(identity)
        if path.exists() or path.is_symlink():
            meta = read_store_meta(path) if path.is_dir() else None
            if meta is None:
                # a folder holding only encoders' embedding stores (wsi-cmaf embed) takes the heatmap too
                if path.is_dir() and not path.is_symlink() and all(p.name == ENCODERS_GROUP for p in path.iterdir()):
                    return cls._create(path, layout, identity, attrs)
                raise OutputError(f"{path} exists and is not a wsi-cmaf heatmap store; "
                                  "refusing to write there (choose another output location)")
            if overwrite or not meta.get("layout_complete"):
                if not meta.get("layout_complete"):
                    logger.warning("%s: incomplete store from an interrupted creation; recreating", path)
                _remove_store(path)
                return cls._create(path, layout, identity, attrs)
            check_format_version(path, meta)
            problems = (json_diff(meta.get("layout"), layout, "layout")
                        + json_diff(meta.get("identity"), identity, "identity"))
            if problems:
                raise StoreMismatchError(
                    f"{path} holds a result made with different inputs; refusing to mix them "
                    f"(use overwrite or another output folder): " + "; ".join(problems[:8])
                    + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""))
            if not resume:
                raise OutputExistsError(f"{path} already exists (pass resume to continue it or overwrite to replace it)")
            store = cls(path, zarr.open_group(str(path), mode="r+", zarr_format=3), writable=True)
            store.recheck_done()  # a done block whose chunks are gone or differ is computed again
            store._set_meta(jsonable(attrs))
            logger.info("%s: resuming, %d/%d blocks already done", path, store._done.sum(), store._done.size)
            return store
        return cls._create(path, layout, identity, attrs)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "HeatmapStore":
        """Open an existing store (``mode`` "r" or "r+"); :class:`OutputError` if it is not one,
        :class:`StoreFormatError` if it was written in another format version."""
        path = Path(path)
        meta = read_store_meta(path) if path.is_dir() else None
        if meta is None:
            raise OutputError(f"{path} is not a wsi-cmaf heatmap store")
        if not meta.get("layout_complete"):
            raise OutputError(f"{path} is an incomplete store (its creation was interrupted)")
        check_format_version(path, meta)
        return cls(path, zarr.open_group(str(path), mode=mode, zarr_format=3), writable=mode != "r")

    @classmethod
    def _create(cls, path: Path, layout: dict, identity: dict, attrs: dict) -> "HeatmapStore":
        attrs = jsonable(attrs)
        c, (rows, cols), (k0, k1) = len(layout["class_names"]), layout["grid_shape"], layout["chunk"]
        geometry = TileGeometry.from_attrs(attrs, tuple(layout["um_per_tile"]))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout, "identity": identity,
                "geometry": geometry.to_dict(), "layout_complete": False, "finalized": False, **attrs}
        # The marker goes in first: an interrupted creation leaves a folder we recognise as ours.
        root = zarr.create_group(str(path), zarr_format=3, attributes={META: meta})
        root.create_array("0", shape=(c, rows, cols), chunks=(c, k0, k1), dtype="float32",
                          fill_value=np.nan, compressors=_compressor(), dimension_names=AXES)
        labels = root.create_group("labels", attributes={"ome": labels_group_metadata(["tissue"])})
        tissue = labels.create_group("tissue", attributes={"ome": label_image_metadata("tissue", 1, geometry.pyramid())})
        tissue.create_array("0", shape=(1, rows, cols), chunks=(1, k0, k1), dtype="uint8", fill_value=0,
                            compressors=_compressor(), dimension_names=AXES)
        group = root.create_group(META, attributes={"errors": {}})
        nb = (-(-rows // k0), -(-cols // k1))
        for name in ("done", "failed"):
            group.create_array(name, shape=nb, chunks=(1, 1), dtype="bool", fill_value=False,
                               dimension_names=("block_y", "block_x"))
        cls._create_failed_tiles(group, (rows, cols), (k0, k1))
        if layout.get("embedding_dim"):
            cls._create_embeddings(root, (rows, cols), (k0, k1), int(layout["embedding_dim"]))
        if layout.get("tasks"):
            cls._create_task_groups(root, layout["tasks"], (rows, cols), (k0, k1), geometry.pyramid())
        meta["layout_complete"] = True
        root.attrs.update({"ome": image_metadata(layout["class_names"], 1, geometry.pyramid()), META: meta})
        logger.info("%s: created heatmap store %s, %d×%d blocks", path, (c, rows, cols), *nb)
        return cls(path, root, writable=True)

    # ------------------------------------------------------------------ state
    # (done / failed flags, failed tiles and their messages: store_blocks.py)
    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance attributes given by the pipeline (slide, model, timings ...)."""
        return {k: v for k, v in self._root.attrs[META].items() if k not in _RESERVED}

    @property
    def n_levels(self) -> int:
        """Number of pyramid levels currently described in the NGFF metadata."""
        return len(self._root.attrs["ome"]["multiscales"][0]["datasets"])

    @property
    def finalized(self) -> bool:
        """True once :meth:`finalize` ran."""
        return bool(self._root.attrs[META].get("finalized"))

    def block_slices(self, block_index: tuple[int, int]) -> tuple[slice, slice]:
        """Tile-row and tile-column ranges of block ``block_index`` (edge blocks are smaller)."""
        by, bx = (int(v) for v in block_index)
        if not (0 <= by < self._done.shape[0] and 0 <= bx < self._done.shape[1]):
            raise IndexError(f"block {block_index} outside the {self._done.shape} block grid")
        (k0, k1), (rows, cols) = self.chunk, self.grid_shape
        return slice(by * k0, min(rows, (by + 1) * k0)), slice(bx * k1, min(cols, (bx + 1) * k1))

    # ------------------------------------------------------------------ writing
    def _check_writable(self) -> None:
        if not self._writable:
            raise OutputError(f"{self.path} was opened read-only")

    def write_block(self, block_index: tuple[int, int], probs: np.ndarray, failed_tiles: np.ndarray | None = None,
                    tile_error: str | None = None, *, embeddings: np.ndarray | None = None,
                    tasks: dict[str, np.ndarray] | None = None, nonfinite: int = 0) -> None:
        """Store ``probs`` float32 (C, h, w) as block ``block_index``'s chunk, then mark it done.

        ``failed_tiles``: bool (h, w), the block's tiles that could not be decoded (their ``probs``
        are NaN), with ``tile_error`` saying why. ``embeddings``: (h, w, D) for a store with an
        ``embeddings`` array. ``tasks``: {task: (C_task, h, w)} for every extra task of a
        multi-task store. ``nonfinite``: how many of the failed tiles failed because the model's
        output was not finite (kept in the block's manifest row). The chunks, the tile mask and
        the manifest row are written before
        the flag, so a crash in between only costs the recomputation of this block. Safe to call
        from several threads for distinct blocks.
        """
        self._check_writable()
        rs, cs = self.block_slices(block_index)
        probs = np.asarray(probs, dtype=np.float32)
        expected = (len(self.class_names), rs.stop - rs.start, cs.stop - cs.start)
        if probs.shape != expected:
            raise ValueError(f"block {tuple(block_index)} needs probabilities of shape {expected}, got {probs.shape}")
        by, bx = (int(v) for v in block_index)
        if embeddings is not None:
            self._write_embeddings(block_index, rs, cs, embeddings)
        if self.tasks or tasks:
            self._write_task_chunks(block_index, rs, cs, tasks)
        self._probs[:, rs, cs] = probs
        self._write_failed_tiles(block_index, rs, cs, failed_tiles, tile_error)
        values = {"0": probs, **{f"{task_group_path(t)}/0": v for t, v in (tasks or {}).items()}}
        if self._emb is not None:
            values["embeddings"] = embeddings if embeddings is not None else self._emb[rs, cs]
        self._record_manifest(block_index, values, nonfinite)  # after the chunks, before the flag
        self._done_arr[by, bx] = True
        with self._lock:
            self._done[by, bx] = True
            was_failed = bool(self._failed[by, bx])
            self._failed[by, bx] = False
        if was_failed:  # a retry succeeded: the block is no longer failed
            self._failed_arr[by, bx] = False
            self._record_error(by, bx, None)

    def write_tissue(self, tissue: np.ndarray, fraction: np.ndarray | None = None) -> None:
        """Store the tile tissue mask (bool (rows, cols)) as the ``labels/tissue`` label image,
        and ``fraction`` (each tile's tissue area fraction, same shape) for the tile table."""
        self._check_writable()
        tissue = np.asarray(tissue)
        if tissue.shape != self.grid_shape:
            raise ValueError(f"tissue mask has shape {tissue.shape}, grid is {self.grid_shape}")
        self._tissue[0] = tissue.astype(np.uint8)
        if fraction is not None:
            self._put_meta_array("tissue_fraction", np.asarray(fraction, dtype=np.float32), tissue.shape)

    def write_tissue_mask(self, mask: np.ndarray, mpp: float) -> None:
        """Store the slide-level tissue mask (bool, one pixel = ``mpp`` µm, covering the whole
        slide from its top-left corner): the overlay draws the real tissue outline from it."""
        self._check_writable()
        self._put_meta_array("tissue_mask", np.asarray(mask, dtype=bool), None, {"mpp": float(mpp)},
                             dims=("mask_y", "mask_x"))  # its own dims: sizes differ from the grid's

    def _put_meta_array(self, name: str, data: np.ndarray, shape: tuple | None, attrs: dict | None = None,
                        dims: tuple[str, ...] = ("y", "x")) -> None:
        if shape is not None and data.shape != tuple(shape):
            raise ValueError(f"{name} has shape {data.shape}, grid is {tuple(shape)}")
        chunks = tuple(max(1, min(n, 2048)) for n in data.shape)  # whole small arrays; large masks in tiles
        arr = self._meta_group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                                            compressors=_compressor(), overwrite=True,
                                            dimension_names=dims, attributes=attrs or {})
        arr[...] = data

    def _set_meta(self, updates: dict[str, Any]) -> None:
        meta = dict(self._root.attrs[META])
        meta.update(updates)
        self._root.attrs[META] = meta

    def finalize(self, *, levels: int = 3, extra_attrs: dict | None = None) -> None:
        """Build pyramid levels 1 .. ``levels - 1`` (2×2 NaN-mean) and write the NGFF metadata.

        ``levels`` counts level 0 and must be >= 3 (at least two downsampled levels).
        Rebuilt from level 0 on every call, so calling it again after more blocks were
        written (resume) gives up-to-date levels. ``extra_attrs`` (e.g. timings) are merged
        into the provenance attributes.
        """
        self._check_writable()
        if levels < 3:
            raise ValueError(f"levels must be >= 3 (level 0 and two downsampled levels), got {levels}")
        t0 = time.perf_counter()
        # One pixel per tile: even a 10 cm slide at 50 µm tiles is 2000², a few MB per class.
        probs = np.asarray(self._probs[...])
        tissue = np.asarray(self._tissue[...])
        tissue_group = self._root["labels/tissue"]
        (k0, k1) = self.chunk
        write_nan_mean_levels(self._root, probs, levels, self.chunk, compressors=_compressor(),
                              dimension_names=AXES, first=1)
        for level in range(1, levels):
            tissue = max_pool2(tissue)
            h, w = tissue.shape[-2:]
            tarr = tissue_group.create_array(str(level), shape=tissue.shape,
                                             chunks=(1, max(1, min(k0, h)), max(1, min(k1, w))),
                                             dtype="uint8", fill_value=0, compressors=_compressor(),
                                             dimension_names=AXES, overwrite=True)
            tarr[...] = tissue
        for group in (self._root, tissue_group):  # levels left over from an earlier, deeper finalize
            drop_levels(group, levels)
        pyramid = self.geometry.pyramid()
        self._finalize_task_groups(levels, pyramid)
        tissue_group.attrs["ome"] = label_image_metadata("tissue", levels, pyramid)
        self._root.attrs["ome"] = image_metadata(self.class_names, levels, pyramid)
        updates = jsonable(extra_attrs or {})
        clash = _RESERVED & set(updates)
        if clash:
            raise ValueError(f"extra_attrs may not use the reserved keys {sorted(clash)}")
        updates.update(finalized=True, finalized_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       blocks={"done": int(self._done.sum()), "failed": int((self._failed & ~self._done).sum()),
                               "total": int(self._done.size)}, failed_tiles=int(self._failed_tiles.sum()))
        self._set_meta(updates)
        logger.debug("%s: finalized %d levels in %.3fs", self.path, levels, time.perf_counter() - t0)

    # ------------------------------------------------------------------ reading
    def probabilities(self, level: int = 0, task: str | None = None) -> np.ndarray:
        """float32 (C, rows, cols) probabilities of pyramid ``level`` (NaN = no value); ``task``
        names another task of a multi-task store (None or the primary task: the main image)."""
        if not self._is_primary(task):
            return np.asarray(self._task_array(task, level)[...])
        if str(level) not in self._root:
            raise OutputError(f"{self.path} has no pyramid level {level} (finalize builds levels >= 1)")
        return np.asarray(self._root[str(level)][...])

    def tissue(self, level: int = 0) -> np.ndarray:
        """bool (rows, cols) tile tissue mask of ``level``."""
        return np.asarray(self._root[f"labels/tissue/{level}"][0]).astype(bool)

    def tissue_fraction(self) -> np.ndarray | None:
        """float32 (rows, cols) tissue area fraction of each tile, or None (older stores)."""
        return np.asarray(self._meta_group["tissue_fraction"][...]) if "tissue_fraction" in self._meta_group else None

    def tissue_mask(self) -> tuple[np.ndarray, float] | None:
        """(slide-level bool tissue mask, its µm/px), or None when the store has none."""
        if "tissue_mask" not in self._meta_group:
            return None
        arr = self._meta_group["tissue_mask"]
        return np.asarray(arr[...], dtype=bool), float(arr.attrs["mpp"])

    def __repr__(self) -> str:
        return (f"HeatmapStore({str(self.path)!r}, grid={self.grid_shape}, classes={self.class_names}, "
                f"done={int(self._done.sum())}/{self._done.size})")


def _remove_store(path: Path) -> None:
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
