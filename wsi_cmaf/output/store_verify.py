"""What each written block of a heatmap store must look like, and the check that it still does.

Zarr reads a missing chunk as its fill value (NaN for probabilities), so a store that lost a
chunk file (copied in part, synced by a tool that skips files, damaged on a network file system)
reads like one whose tiles were never computed, and its done flags still say "done". Every
:meth:`~wsi_cmaf.output.store.HeatmapStore.write_block` therefore records, before the done flag,
one manifest row per block (``wsi_cmaf/manifest``, int64 (block rows, block cols, F), chunk
(1, 1, F), so blocks never share a chunk): a format marker, the number of tiles with a
probability, the number of tiles whose model output was not finite, and for every data array
the block owns (level 0 ``0``, each extra task's ``tasks/<task>/0``, ``embeddings``) the CRC-32
of the values written and the size of the stored chunk file (0: no file, all fill value).

The chunk keys of a block follow from the layout (``0/c/0/<by>/<bx>`` for level 0 in zarr v3),
so the cheap check lists them and compares their sizes with the manifest: one ``stat`` per chunk,
no data read. A deep check (:func:`verify_store` with ``deep``) rereads each block and compares
its CRC and tile count.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("wsi_cmaf.output.store")

MANIFEST = "manifest"
MANIFEST_VERSION = 1
_HEAD = ("version", "n_values", "n_nonfinite")  # then (crc32, nbytes) per data array


def crc32(values: np.ndarray) -> int:
    """CRC-32 of ``values``' bytes in C order (what a reread must give back exactly)."""
    return zlib.crc32(np.ascontiguousarray(values).tobytes()) & 0xFFFFFFFF


@dataclass
class BlockProblem:
    """One damaged block: its index and what is wrong with it."""

    index: tuple[int, int]
    reason: str

    def __str__(self) -> str:
        return f"block {self.index}: {self.reason}"


@dataclass
class VerifyReport:
    """The outcome of checking a store's done blocks against their manifest rows."""

    path: Path
    deep: bool
    blocks_total: int
    blocks_done: int
    blocks_failed: int
    finalized: bool
    problems: list[BlockProblem] = field(default_factory=list)
    #: the lock record of a run writing the store right now ({} when none): its blocks may change
    writer: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every done block matches its manifest."""
        return not self.problems

    def lines(self) -> list[str]:
        """Human-readable report: a headline, then one line per damaged block."""
        how = "data reread" if self.deep else "chunk keys and sizes"
        head = (f"{self.path}: {self.blocks_done}/{self.blocks_total} blocks done, {self.blocks_failed} failed, "
                f"{'finalized' if self.finalized else 'not finalized'}; checked {how}: ")
        busy = ([f"  note: pid {self.writer.get('pid')} on {self.writer.get('host')} is writing this store now; "
                 "a block it is rewriting can look damaged until it is done"] if self.writer else [])
        if self.ok:
            return [head + "whole", *busy]
        return [head + f"{len(self.problems)} damaged block(s) (rerun the same analysis to recompute them)",
                *(f"  {p}" for p in self.problems), *busy]


class BlockManifestMixin:
    """Per-block manifest rows; mixed into HeatmapStore (uses its arrays, caches and helpers)."""

    _root: Any
    _meta_group: Any
    _done: np.ndarray
    _done_arr: Any
    _failed_tiles: np.ndarray
    _lock: Any
    tissue: Any
    _emb: Any
    path: Path
    tasks: dict[str, list[str]]
    block_slices: Any

    # ---------------------------------------------------------------- layout
    def _data_arrays(self) -> list[tuple[str, Any]]:
        """(path in the store, zarr array) of every data array a block owns one chunk of."""
        from wsi_cmaf.output.store_tasks import task_group_path

        arrays = [("0", self._root["0"])]
        arrays += [(f"{task_group_path(t)}/0", self._root[task_group_path(t)]["0"]) for t in list(self.tasks)[1:]]
        if self._emb is not None:
            arrays.append(("embeddings", self._emb))
        return arrays

    @staticmethod
    def _chunk_coords(name: str, by: int, bx: int) -> tuple[int, ...]:
        return (by, bx, 0) if name == "embeddings" else (0, by, bx)

    def chunk_keys(self, block_index: tuple[int, int]) -> list[str]:
        """The store keys of the data chunks block ``block_index`` owns (e.g. ``0/c/0/1/2``)."""
        by, bx = (int(v) for v in block_index)
        return [f"{name}/{arr.metadata.encode_chunk_key(self._chunk_coords(name, by, bx))}"
                for name, arr in self._data_arrays()]

    @staticmethod
    def _create_manifest(group: Any, block_grid: tuple[int, int], n_arrays: int) -> Any:
        width = len(_HEAD) + 2 * n_arrays
        return group.create_array(MANIFEST, shape=(*block_grid, width), chunks=(1, 1, width), dtype="int64",
                                  fill_value=0, dimension_names=("block_y", "block_x", "field"),
                                  attributes={"fields": [*_HEAD, "crc32/nbytes per data array"]})

    def _manifest_array(self) -> Any | None:
        return self._meta_group.get(MANIFEST)

    def _open_manifest(self, writable: bool) -> None:
        arrays = self._data_arrays()
        arr = self._manifest_array()
        if arr is None and writable:  # new, or from before manifests (its done blocks cannot be checked)
            arr = self._create_manifest(self._meta_group, self._done.shape, len(arrays))
            arr.attrs["arrays"] = [name for name, _ in arrays]
        self._manifest = arr

    # ---------------------------------------------------------------- writing
    def _record_manifest(self, block_index: tuple[int, int], values: dict[str, np.ndarray], n_nonfinite: int) -> None:
        """Write block ``block_index``'s manifest row from the ``values`` just stored ({array path:
        data in the array's dtype}); called after its chunks, before its done flag."""
        by, bx = (int(v) for v in block_index)
        row = [MANIFEST_VERSION, int(np.isfinite(values["0"][0]).sum()), int(n_nonfinite)]
        for name, arr in self._data_arrays():
            data = np.asarray(values[name], dtype=arr.dtype)
            row += [crc32(data), self._chunk_nbytes(name, arr, by, bx)]
        self._manifest[by, bx] = np.asarray(row, dtype=np.int64)

    def _chunk_nbytes(self, name: str, arr: Any, by: int, bx: int) -> int:
        key = arr.metadata.encode_chunk_key(self._chunk_coords(name, by, bx))
        try:
            return os.stat(self.path / name / key).st_size
        except FileNotFoundError:
            return 0  # the chunk holds only the fill value, so zarr wrote no file

    def nonfinite_tiles(self) -> int:
        """Tiles of done blocks whose model output was NaN or Inf (recorded per block)."""
        arr = self._manifest_array()
        if arr is None or not self._done.any():
            return 0
        rows = np.asarray(arr[...])
        return int(rows[..., 2][self._done & (rows[..., 0] > 0)].sum())

    # ---------------------------------------------------------------- checking
    def check_blocks(self, deep: bool = False) -> list[BlockProblem]:
        """Every done block whose chunks do not match its manifest row (missing, other size, and
        with ``deep`` another CRC, tile count or an unreadable chunk).

        A block written before manifests existed is checked for what can still be known: a block
        with tissue tiles that did not fail must have its level-0 chunk.
        """
        arr = self._manifest_array()
        done = np.argwhere(self._done)
        if not len(done):
            return []
        rows = np.asarray(arr[...]) if arr is not None else None
        arrays = self._data_arrays()
        expected = None
        problems = []
        for by, bx in done.tolist():
            if rows is None or rows[by, bx, 0] == 0:
                if expected is None:  # tiles that must have a value in a store without manifest rows
                    expected = self.tissue() & ~self._failed_tiles
                why = self._presence_problem(by, bx, expected, arrays[0])
            else:
                why = self._block_problem(by, bx, rows[by, bx], arrays, deep)
            if why:
                problems.append(BlockProblem((by, bx), why))
        return problems

    def _presence_problem(self, by: int, bx: int, expected: np.ndarray, level0: tuple[str, Any]) -> str | None:
        rs, cs = self.block_slices((by, bx))
        name, arr = level0
        if expected[rs, cs].any() and not self._chunk_nbytes(name, arr, by, bx):
            key = f"{name}/{arr.metadata.encode_chunk_key(self._chunk_coords(name, by, bx))}"
            return f"chunk {key} is missing (a block written before manifests: only its presence is checked)"
        return None

    def _block_problem(self, by: int, bx: int, row: np.ndarray, arrays: list, deep: bool) -> str | None:
        for i, (name, arr) in enumerate(arrays):
            want_crc, want_size = int(row[3 + 2 * i]), int(row[4 + 2 * i])
            key = f"{name}/{arr.metadata.encode_chunk_key(self._chunk_coords(name, by, bx))}"
            size = self._chunk_nbytes(name, arr, by, bx)
            if size != want_size:
                if size == 0:
                    return f"chunk {key} is missing (written with {want_size} bytes)"
                return f"chunk {key} has {size} bytes, {want_size} were written (truncated or replaced)"
            if deep:
                rs, cs = self.block_slices((by, bx))
                try:
                    data = np.asarray(arr[rs, cs] if name == "embeddings" else arr[:, rs, cs])
                except Exception as exc:  # any decoding failure of a damaged chunk is the finding
                    return f"chunk {key} cannot be read: {type(exc).__name__}: {exc}"
                if crc32(data) != want_crc:
                    return f"chunk {key} holds other values than were written (CRC-32 differs)"
                if i == 0 and int(np.isfinite(data[0]).sum()) != int(row[1]):
                    return f"chunk {key} has {int(np.isfinite(data[0]).sum())} tiles with a value, {int(row[1])} were written"
        return None

    def recheck_done(self) -> list[BlockProblem]:
        """On resume: clear the done flag of every done block that fails the cheap check, so the
        run computes it again; returns the problems found (each logged)."""
        problems = self.check_blocks(deep=False)
        if not problems:
            return []
        for p in problems:
            self._done_arr[p.index] = False
            with self._lock:
                self._done[p.index] = False
        shown = "; ".join(str(p) for p in problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        logger.warning("%s: %d done block(s) do not match what was written and are computed again: %s",
                       self.path, len(problems), shown)
        return problems


def verify_store(path: str | Path, deep: bool = False) -> VerifyReport:
    """Check the done blocks of the store at ``path`` against their manifest rows (read-only).

    The default lists chunk files and compares sizes; ``deep`` rereads every done block.
    """
    from wsi_cmaf.output.store import HeatmapStore
    from wsi_cmaf.output.store_lock import read_lock_record

    store = HeatmapStore.open(path, "r")
    return VerifyReport(path=store.path, deep=deep, blocks_total=int(store.done.size),
                        blocks_done=int(store.done.sum()), blocks_failed=int((store.failed & ~store.done).sum()),
                        finalized=store.finalized, problems=store.check_blocks(deep=deep),
                        writer=read_lock_record(store.path))
