"""The data chunks of one inference block of a heatmap store (:mod:`wsi_cmaf.output.store_layout`).

A block owns one chunk of every data array: level 0 of the probabilities, level 0 of each extra
task of a multi-task model, and the embeddings when the store has them (:func:`block_slices`
gives its tile ranges). :func:`write_block_data`
checks what a block brings against the layout, writes those chunks and returns the values the
block's manifest row is computed from (:func:`wsi_cmaf.output.store_verify.manifest_row`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_cmaf.output.task_groups import task_group_path, write_task_chunks
from wsi_cmaf.zarr_nodes import member_array, read


def block_slices(block_index: tuple[int, int], block_grid: tuple[int, int], chunk: tuple[int, int],
                 grid_shape: tuple[int, int]) -> tuple[slice, slice]:
    """Tile-row and tile-column ranges of block ``block_index`` (edge blocks are smaller);
    IndexError outside the ``block_grid``."""
    by, bx = (int(v) for v in block_index)
    if not (0 <= by < block_grid[0] and 0 <= bx < block_grid[1]):
        raise IndexError(f"block {block_index} outside the {tuple(block_grid)} block grid")
    (k0, k1), (rows, cols) = chunk, grid_shape
    return slice(by * k0, min(rows, (by + 1) * k0)), slice(bx * k1, min(cols, (bx + 1) * k1))


def failed_tile_mask(block_index: tuple[int, int], rs: slice, cs: slice,
                     failed_tiles: np.ndarray | None) -> np.ndarray:
    """A block's failed-tile mask as bool of the block's shape (None: no tile failed);
    ValueError when it has another shape."""
    shape = (rs.stop - rs.start, cs.stop - cs.start)
    bad = np.zeros(shape, bool) if failed_tiles is None else np.asarray(failed_tiles, dtype=bool)
    if bad.shape != shape:
        raise ValueError(f"block {tuple(block_index)} needs a failed-tile mask of shape {shape}, got {bad.shape}")
    return bad


def write_block_data(root: zarr.Group, layout: dict[str, Any], block_index: tuple[int, int], rs: slice, cs: slice,
                     probs: np.ndarray, embeddings: np.ndarray | None, tasks: dict[str, np.ndarray] | None,
                     path: Path) -> dict[str, np.ndarray]:
    """Write block ``block_index`` (tile rows ``rs``, columns ``cs``) of every data array of the
    store at ``root``; ValueError naming the array when a shape does not fit ``layout``.

    ``probs`` float32 (C, h, w); ``embeddings`` (h, w, D), required by nothing (a store with an
    embeddings array keeps NaN where none was given); ``tasks`` {task: (C_task, h, w)} for every
    extra task. Returns {array path: the values it now holds for the block}.
    """
    probs = np.asarray(probs, dtype=np.float32)
    expected = (len(layout["class_names"]), rs.stop - rs.start, cs.stop - cs.start)
    if probs.shape != expected:
        raise ValueError(f"block {tuple(block_index)} needs probabilities of shape {expected}, got {probs.shape}")
    dim = layout["embedding_dim"]
    if embeddings is not None:
        if not dim:
            raise ValueError(f"{path} has no embeddings array (create it with embedding_dim)")
        want = (*probs.shape[1:], int(dim))
        if embeddings.shape != want:
            raise ValueError(f"block {tuple(block_index)} needs embeddings of shape {want}, got {embeddings.shape}")
        member_array(root, "embeddings")[rs, cs] = np.asarray(embeddings, dtype=np.float16)
    if layout["tasks"] or tasks:
        write_task_chunks(root, layout["tasks"], block_index, rs, cs, tasks)
    member_array(root, "0")[:, rs, cs] = probs
    values = {"0": probs, **{f"{task_group_path(t)}/0": v for t, v in (tasks or {}).items()}}
    if dim:
        stored = embeddings if embeddings is not None else read(member_array(root, "embeddings"), (rs, cs))
        values["embeddings"] = stored
    return values
