"""The heatmap store of one slide: :class:`HeatmapStore` writes and reads it.

Its on-disk layout (an OME-Zarr (NGFF 0.5) pyramid of class probabilities in one Zarr v3 store,
plus bookkeeping arrays) is described and created in :mod:`wsi_cmaf.output.store_layout`; the
per-block manifest and its checks are in :mod:`wsi_cmaf.output.store_verify`, a block's data
chunks in :mod:`wsi_cmaf.output.store_blocks`, the extra tasks of multi-task models in
:mod:`wsi_cmaf.output.task_groups`. Blocks written by different threads
never share a chunk; the in-memory copies of the flags (read once at open) and the message
attributes (one JSON document, keyed ``"by,bx"``) are updated under the store's lock.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from wsi_cmaf.errors import OutputError, OutputExistsError
from wsi_cmaf.output._json import jsonable
from wsi_cmaf.output.geometry import TileGeometry
from wsi_cmaf.output.store_blocks import block_slices, failed_tile_mask, write_block_data
from wsi_cmaf.output.store_layout import (
    META,
    RESERVED,
    block_messages,
    check_attrs,
    create_store,
    data_arrays,
    existing_meta,
    make_layout,
    prepare_location,
    put_meta_array,
    set_block_message,
    write_pyramid,
)
from wsi_cmaf.output.store_verify import MANIFEST, BlockProblem, check_blocks, chunk_key, manifest_row
from wsi_cmaf.output.store_verify import nonfinite_tiles as _nonfinite_tiles
from wsi_cmaf.output.task_groups import check_task, task_array
from wsi_cmaf.zarr_nodes import attrs_dict, member_array, member_group, read

logger = logging.getLogger(__name__)


def _read_only(a: np.ndarray) -> np.ndarray:
    """A view of ``a`` that callers cannot write through (the store owns the block state)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _pair(values: Any) -> tuple[Any, Any]:
    """A two-entry layout field (a JSON list) as a tuple."""
    first, second = values
    return first, second


class HeatmapStore:
    """Writer/reader of one slide's heatmap store (see module docstring for the layout)."""

    def __init__(self, path: Path, root: zarr.Group, *, writable: bool) -> None:
        self.path = Path(path)
        self._root = root
        self._writable = writable
        meta = attrs_dict(root)[META]
        self._layout = layout = meta["layout"]
        self.grid_shape: tuple[int, int] = _pair(layout["grid_shape"])
        self.chunk: tuple[int, int] = _pair(layout["chunk"])
        self.class_names: list[str] = list(layout["class_names"])
        self.um_per_tile: tuple[float, float] = _pair(layout["um_per_tile"])
        self.embedding_dim: int | None = layout["embedding_dim"]
        #: {task: class names}, primary task (the main image) first; {} for a single-task store
        self.tasks: dict[str, list[str]] = {k: list(v) for k, v in layout["tasks"].items()}
        self._emb = member_array(root, "embeddings") if self.embedding_dim else None
        self.identity: dict[str, Any] = meta.get("identity", {})
        self.geometry = TileGeometry.from_dict(meta["geometry"])
        self._meta_group = member_group(root, META)
        self._tissue = member_array(root, "labels/tissue/0")
        self._done_arr = member_array(self._meta_group, "done")
        self._failed_arr = member_array(self._meta_group, "failed")
        # Cached flags: the pipeline asks done[b] for every block; one read at open is enough.
        self._done = read(self._done_arr).astype(bool)
        self._failed = read(self._failed_arr).astype(bool)
        self._failed_tiles_arr = member_array(self._meta_group, "failed_tiles")
        self._failed_tiles = read(self._failed_tiles_arr).astype(bool)
        self._lock = threading.Lock()  # guards the caches and the "errors" attributes only
        self._data = data_arrays(root, layout)  # the arrays a block owns one chunk of
        self._manifest = member_array(self._meta_group, MANIFEST)  # what each block wrote (store_verify.py)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_or_create(
        cls, path: str | Path, *, grid_shape: tuple[int, int], chunk: tuple[int, int],
        class_names: list[str], identity: dict, attrs: dict, um_per_tile: tuple[float, float],
        resume: bool = True, overwrite: bool = False, embedding_dim: int | None = None,
        tasks: dict[str, list[str]] | None = None,
    ) -> HeatmapStore:
        """Open the store at ``path`` for writing, creating it if needed.

        An existing store is resumed only if ``identity`` (slide fingerprint, model, weights,
        configs) and the layout match (else :class:`StoreMismatchError` naming what differs; a store
        of another format version raises :class:`StoreFormatError`)
        and ``resume`` is true (else :class:`OutputExistsError`). ``overwrite`` replaces an
        existing *wsi-cmaf store* only; any other existing file or non-empty folder raises
        :class:`OutputError` and is left untouched. ``embedding_dim`` adds the ``embeddings`` array;
        it is part of the layout, so a store is never resumed with and without embeddings.
        ``tasks`` ({task: class names}, primary first; its first entry must be ``class_names``)
        adds one ``tasks/<task>`` image group per task after the first (task_groups.py).
        """
        path = Path(path)
        layout = make_layout(grid_shape, chunk, class_names, um_per_tile, embedding_dim, tasks)
        check_attrs(attrs)
        identity = jsonable(identity)
        meta = prepare_location(path, layout, identity, overwrite=overwrite)
        if meta is not None:
            if not resume:
                raise OutputExistsError(f"{path} already exists (pass resume to continue it or overwrite to "
                                        "replace it)")
            store = cls(path, zarr.open_group(str(path), mode="r+", zarr_format=3), writable=True)
            store.recheck_done()  # a done block whose chunks are gone or differ is computed again
            store._set_meta(jsonable(attrs))
            logger.info("%s: resuming, %d/%d blocks already done", path, store._done.sum(), store._done.size)
            return store
        return cls(path, create_store(path, layout, identity, jsonable(attrs)), writable=True)

    @classmethod
    def open(cls, path: str | Path, mode: Literal["r", "r+"] = "r") -> HeatmapStore:
        """Open an existing store (``mode`` "r" or "r+"); :class:`OutputError` if it is not one,
        :class:`StoreFormatError` if it was written in another format version."""
        path = Path(path)
        existing_meta(path)
        return cls(path, zarr.open_group(str(path), mode=mode, zarr_format=3), writable=mode != "r")

    # ------------------------------------------------------------------ state
    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance attributes given by the pipeline (slide, model, timings ...)."""
        return {k: v for k, v in attrs_dict(self._root)[META].items() if k not in RESERVED}

    @property
    def n_levels(self) -> int:
        """Number of pyramid levels currently described in the NGFF metadata."""
        return len(attrs_dict(self._root)["ome"]["multiscales"][0]["datasets"])

    @property
    def finalized(self) -> bool:
        """True once :meth:`finalize` ran."""
        return bool(attrs_dict(self._root)[META].get("finalized"))

    def block_slices(self, block_index: tuple[int, int]) -> tuple[slice, slice]:
        """Tile-row and tile-column ranges of block ``block_index`` (edge blocks are smaller)."""
        return block_slices(block_index, self._done.shape, self.chunk, self.grid_shape)

    @property
    def done(self) -> np.ndarray:
        """bool (block rows, block cols): blocks whose probabilities are stored (read-only view)."""
        return _read_only(self._done)

    @property
    def failed(self) -> np.ndarray:
        """bool (block rows, block cols): blocks whose last attempt failed (read-only view)."""
        return _read_only(self._failed)

    @property
    def failed_tiles(self) -> np.ndarray:
        """bool (rows, cols): tissue tiles of written blocks that could not be decoded (read-only)."""
        return _read_only(self._failed_tiles)

    @property
    def errors(self) -> dict[tuple[int, int], str]:
        """Error message of every failed block."""
        return block_messages(self._meta_group, "errors")

    @property
    def tile_errors(self) -> dict[tuple[int, int], str]:
        """Error message (the first bad tile's) of every block with failed tiles."""
        return block_messages(self._meta_group, "tile_errors")

    def block_has_failed_tiles(self, block_index: tuple[int, int]) -> bool:
        """Whether block ``block_index`` was written with undecodable tiles (a rerun retries it)."""
        rs, cs = self.block_slices(block_index)
        return bool(self._failed_tiles[rs, cs].any())

    @property
    def primary_task(self) -> str | None:
        """Name of the task in the main image (None for a single-task store, whose task is unnamed)."""
        return next(iter(self.tasks), None)

    @property
    def extra_tasks(self) -> list[str]:
        """Tasks stored in ``tasks/<task>`` groups, in the model's order (empty for single-task stores)."""
        return list(self.tasks)[1:]

    def task_class_names(self, task: str | None = None) -> list[str]:
        """Class names of ``task`` (None or the primary task: the main image's)."""
        if task is None or task == self.primary_task:
            return list(self.class_names)
        return list(self.tasks[check_task(self.tasks, task, self.path)])

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
        the manifest row are written before the flag, so a crash in between only costs the
        recomputation of this block. Safe to call from several threads for distinct blocks.
        """
        self._check_writable()
        rs, cs = self.block_slices(block_index)
        values = write_block_data(self._root, self._layout, block_index, rs, cs, probs, embeddings, tasks, self.path)
        self._write_failed_tiles(block_index, rs, cs, failed_tiles, tile_error)
        by, bx = (int(v) for v in block_index)
        self._manifest[by, bx] = manifest_row(self.path, self._data, values, by, bx, nonfinite)
        self._done_arr[by, bx] = True
        with self._lock:
            self._done[by, bx] = True
            was_failed = bool(self._failed[by, bx])
            self._failed[by, bx] = False
        if was_failed:  # a retry succeeded: the block is no longer failed
            self._failed_arr[by, bx] = False
            self._record_error(by, bx, None)

    def _write_failed_tiles(self, block_index: tuple[int, int], rs: slice, cs: slice,
                            failed_tiles: np.ndarray | None, tile_error: str | None) -> None:
        """Store a block's failed-tile mask (bool, the block's shape; None: none failed) and its
        ``tile_error``; a clean rewrite clears what an earlier attempt recorded."""
        by, bx = (int(v) for v in block_index)
        bad = failed_tile_mask(block_index, rs, cs, failed_tiles)
        if bad.any() or self._failed_tiles[rs, cs].any():  # untouched chunks stay absent (fill value)
            self._failed_tiles_arr[rs, cs] = bad
            with self._lock:
                self._failed_tiles[rs, cs] = bad
            self._record_error(by, bx, (tile_error or "undecodable tile") if bad.any() else None, "tile_errors")

    def mark_failed(self, block_index: tuple[int, int], error: str) -> None:
        """Flag block ``block_index`` as failed and record ``error`` (rerunning retries it)."""
        self._check_writable()
        self.block_slices(block_index)  # bounds check
        by, bx = (int(v) for v in block_index)
        self._failed_arr[by, bx] = True
        with self._lock:
            self._failed[by, bx] = True
        self._record_error(by, bx, str(error))
        logger.warning("%s: block (%d, %d) failed: %s", self.path.name, by, bx, error)

    def _record_error(self, by: int, bx: int, error: str | None, key: str = "errors") -> None:
        with self._lock:  # attributes are one JSON document: serialise its updates
            set_block_message(self._meta_group, by, bx, error, key)

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

    def write_inside_fraction(self, inside: np.ndarray) -> None:
        """Store each tile's share of area inside the slide (float32, grid shape; < 1 marks a
        partial edge tile, padded with white beyond the slide: see the "edge_tiles" attribute)."""
        self._check_writable()
        self._put_meta_array("inside_fraction", np.asarray(inside, dtype=np.float32), tuple(self.grid_shape))

    def write_background(self, rgb: np.ndarray) -> None:
        """Store the overlay's background picture (RGB uint8 of the whole slide) for resumed runs."""
        self._check_writable()
        self._put_meta_array("overlay_background", np.asarray(rgb, dtype=np.uint8), None, dims=("bg_y", "bg_x", "rgb"))

    def write_inputs(self, facts: dict[str, Any]) -> None:
        """Merge ``facts`` (JSON-able) into the run's stored inputs (see :meth:`inputs`)."""
        self._check_writable()
        with self._lock:  # one JSON document with the "errors" attributes: serialise updates
            self._meta_group.attrs["inputs"] = {**attrs_dict(self._meta_group).get("inputs", {}), **jsonable(facts)}

    def _put_meta_array(self, name: str, data: np.ndarray, shape: tuple | None, attrs: dict | None = None,
                        dims: tuple[str, ...] = ("y", "x")) -> None:
        put_meta_array(self._meta_group, name, data, shape, attrs, dims)

    def _set_meta(self, updates: dict[str, Any]) -> None:
        meta = dict(attrs_dict(self._root)[META])
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
        write_pyramid(self._root, levels, self.chunk, self.geometry.pyramid(), self.class_names, self.tasks)
        updates = check_attrs(extra_attrs or {}, "extra_attrs")
        updates.update(finalized=True, finalized_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       blocks={"done": int(self._done.sum()), "failed": int((self._failed & ~self._done).sum()),
                               "total": int(self._done.size)}, failed_tiles=int(self._failed_tiles.sum()))
        self._set_meta(updates)
        logger.debug("%s: finalized %d levels in %.3fs", self.path, levels, time.perf_counter() - t0)

    # ------------------------------------------------------------------ reading
    def probabilities(self, level: int = 0, task: str | None = None) -> np.ndarray:
        """float32 (C, rows, cols) probabilities of pyramid ``level`` (NaN = no value); ``task``
        names another task of a multi-task store (None or the primary task: the main image)."""
        if task is not None and task != self.primary_task:
            return read(task_array(self._root, self.tasks, task, level, self.path))
        if str(level) not in self._root:
            raise OutputError(f"{self.path} has no pyramid level {level} (finalize builds levels >= 1)")
        return read(member_array(self._root, str(level)))

    def tissue(self, level: int = 0) -> np.ndarray:
        """bool (rows, cols) tile tissue mask of ``level``."""
        return read(member_array(self._root, f"labels/tissue/{level}"), 0).astype(bool)

    def tissue_fraction(self) -> np.ndarray:
        """float32 (rows, cols) tissue area fraction of each tile (NaN until :meth:`write_tissue` gave one)."""
        return read(member_array(self._meta_group, "tissue_fraction"))

    def tissue_mask(self) -> tuple[np.ndarray, float] | None:
        """(slide-level bool tissue mask, its µm/px), or None when the store has none."""
        if "tissue_mask" not in self._meta_group:
            return None
        arr = member_array(self._meta_group, "tissue_mask")
        return read(arr).astype(bool), float(attrs_dict(arr)["mpp"])

    def embeddings(self) -> np.ndarray | None:
        """float16 (rows, cols, D) tile embeddings (NaN where none), or None when not stored."""
        return None if self._emb is None else read(self._emb)

    def inside_fraction(self) -> np.ndarray:
        """float32 (rows, cols) share of each tile inside the slide (1 until
        :meth:`write_inside_fraction` stored the grid's)."""
        return read(member_array(self._meta_group, "inside_fraction"))

    def background(self) -> np.ndarray | None:
        """The overlay background stored by :meth:`write_background`, or None."""
        if "overlay_background" not in self._meta_group:
            return None
        return read(member_array(self._meta_group, "overlay_background"))

    def inputs(self) -> dict[str, Any]:
        """What the pipeline stored to resume without recomputing (tissue stage facts, stain fit);
        the store's identity check guarantees they belong to the same slide, model and settings."""
        return dict(attrs_dict(self._meta_group).get("inputs", {}))

    # ------------------------------------------------------------------ manifest (store_verify.py)
    def chunk_keys(self, block_index: tuple[int, int]) -> list[str]:
        """The store keys of the data chunks block ``block_index`` owns (e.g. ``0/c/0/1/2``)."""
        by, bx = (int(v) for v in block_index)
        return [chunk_key(name, arr, by, bx) for name, arr in self._data]

    def nonfinite_tiles(self) -> int:
        """Tiles of done blocks whose model output was NaN or Inf (recorded per block)."""
        return _nonfinite_tiles(self._manifest, self._done)

    def check_blocks(self, deep: bool = False) -> list[BlockProblem]:
        """Every done block whose chunks do not match its manifest row (missing, other size, and
        with ``deep`` another CRC, tile count or an unreadable chunk) or that has no row."""
        return check_blocks(self.path, self._manifest, self._done, self._data, self.block_slices, deep)

    def recheck_done(self) -> list[BlockProblem]:
        """On resume: clear the done flag of every done block that fails the cheap check, so the
        run computes it again; returns the problems found (logged)."""
        problems = self.check_blocks(deep=False)
        for p in problems:
            self._done_arr[p.index] = False
            with self._lock:
                self._done[p.index] = False
        if problems:
            more = f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""
            shown = "; ".join(str(p) for p in problems[:5]) + more
            logger.warning("%s: %d done block(s) do not match what was written and are computed again: %s",
                           self.path, len(problems), shown)
        return problems

    def __repr__(self) -> str:
        return (f"HeatmapStore({str(self.path)!r}, grid={self.grid_shape}, classes={self.class_names}, "
                f"done={int(self._done.sum())}/{self._done.size})")
