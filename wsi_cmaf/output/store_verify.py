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
no data read. A deep check (:func:`wsi_cmaf.output.verify.verify_store` with ``deep``) rereads each block and compares
its CRC and tile count. These are functions of the store's arrays; the store calls them.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def chunk_key(name: str, arr: Any, by: int, bx: int) -> str:
    """Store key of block ``(by, bx)``'s chunk of data array ``name`` (e.g. ``0/c/0/1/2``)."""
    coords = (by, bx, 0) if name == "embeddings" else (0, by, bx)
    return f"{name}/{arr.metadata.encode_chunk_key(coords)}"


def chunk_nbytes(store_path: Path, name: str, arr: Any, by: int, bx: int) -> int:
    """Size of the stored chunk file of block ``(by, bx)`` in array ``name`` (0: no file)."""
    try:
        return os.stat(Path(store_path) / chunk_key(name, arr, by, bx)).st_size
    except FileNotFoundError:
        return 0  # the chunk holds only the fill value, so zarr wrote no file


def create_manifest(group: Any, block_grid: tuple[int, int], arrays: list[str]) -> Any:
    """The ``manifest`` array in ``group``: one row per block for the data ``arrays`` (their paths)."""
    width = len(_HEAD) + 2 * len(arrays)
    arr = group.create_array(MANIFEST, shape=(*block_grid, width), chunks=(1, 1, width), dtype="int64",
                             fill_value=0, dimension_names=("block_y", "block_x", "field"),
                             attributes={"fields": [*_HEAD, "crc32/nbytes per data array"]})
    arr.attrs["arrays"] = list(arrays)
    return arr


def manifest_row(store_path: Path, arrays: list[tuple[str, Any]], values: dict[str, np.ndarray],
                 by: int, bx: int, n_nonfinite: int) -> np.ndarray:
    """Block ``(by, bx)``'s manifest row from the ``values`` just stored ({array path: data}) and
    the sizes of their chunk files; written after the chunks, before the block's done flag."""
    row = [MANIFEST_VERSION, int(np.isfinite(values["0"][0]).sum()), int(n_nonfinite)]
    for name, arr in arrays:
        row += [crc32(np.asarray(values[name], dtype=arr.dtype)), chunk_nbytes(store_path, name, arr, by, bx)]
    return np.asarray(row, dtype=np.int64)


def nonfinite_tiles(manifest: Any, done: np.ndarray) -> int:
    """Tiles of ``done`` blocks whose model output was NaN or Inf (recorded per block)."""
    if not done.any():
        return 0
    return int(np.asarray(manifest[...])[..., 2][done].sum())


def check_blocks(store_path: Path, manifest: Any, done: np.ndarray, arrays: list[tuple[str, Any]],
                 block_slices: Callable[[tuple[int, int]], tuple[slice, slice]],
                 deep: bool = False) -> list[BlockProblem]:
    """Every ``done`` block whose chunks do not match its manifest row (missing, other size, and
    with ``deep`` another CRC, tile count or an unreadable chunk), or whose row is gone (the row
    is written before the done flag, so a done block without one lost its manifest chunk)."""
    blocks = np.argwhere(done)
    if not len(blocks):
        return []
    rows = np.asarray(manifest[...])
    problems = []
    for by, bx in blocks.tolist():
        why: str | None
        if rows[by, bx, 0] == 0:
            why = "its manifest row is missing (the manifest chunk was lost), so what it holds is unknown"
        else:
            why = _block_problem(store_path, by, bx, rows[by, bx], arrays, block_slices((by, bx)), deep)
        if why:
            problems.append(BlockProblem((by, bx), why))
    return problems


def _block_problem(store_path: Path, by: int, bx: int, row: np.ndarray, arrays: list[tuple[str, Any]],
                   slices: tuple[slice, slice], deep: bool) -> str | None:
    for i, (name, arr) in enumerate(arrays):
        want_crc, want_size = int(row[3 + 2 * i]), int(row[4 + 2 * i])
        key = chunk_key(name, arr, by, bx)
        size = chunk_nbytes(store_path, name, arr, by, bx)
        if size != want_size:
            if size == 0:
                return f"chunk {key} is missing (written with {want_size} bytes)"
            return f"chunk {key} has {size} bytes, {want_size} were written (truncated or replaced)"
        if deep:
            rs, cs = slices
            try:
                data = np.asarray(arr[rs, cs] if name == "embeddings" else arr[:, rs, cs])
            except Exception as exc:  # any decoding failure of a damaged chunk is the finding
                return f"chunk {key} cannot be read: {type(exc).__name__}: {exc}"
            if crc32(data) != want_crc:
                return f"chunk {key} holds other values than were written (CRC-32 differs)"
            with_value = int(np.isfinite(data[0]).sum())
            if i == 0 and with_value != int(row[1]):
                return f"chunk {key} has {with_value} tiles with a value, {int(row[1])} were written"
    return None
