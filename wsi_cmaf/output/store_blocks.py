"""The part of :class:`~wsi_cmaf.output.store.HeatmapStore` that keeps each block's state: the
``done`` and ``failed`` flags, the ``failed_tiles`` mask of undecodable tissue tiles, and their
messages (the bookkeeping group's "errors" and "tile_errors" attributes, keyed ``"by,bx"``).

Every block owns one chunk of ``done``, ``failed`` and ``failed_tiles``, so blocks written by
different threads never share a chunk; the in-memory copies (read once when the store opens) and
the message attributes (one JSON document) are updated under the store's lock.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger("wsi_cmaf.output.store")  # the store's messages keep the store's logger name


def _read_only(a: np.ndarray) -> np.ndarray:
    """A view of ``a`` that callers cannot write through (the store owns the block state)."""
    v = a.view()
    v.flags.writeable = False
    return v


class BlockStateMixin:
    """Per-block state; mixed into HeatmapStore (uses its arrays, caches, ``_lock`` and helpers)."""

    _meta_group: Any
    _lock: Any
    _done: np.ndarray
    _failed: np.ndarray
    _failed_arr: Any
    _failed_tiles: np.ndarray
    _failed_tiles_arr: Any
    _check_writable: Any
    block_slices: Any
    path: Any

    @staticmethod
    def _create_failed_tiles(group: Any, shape: tuple[int, int], chunk: tuple[int, int]) -> None:
        from wsi_cmaf.output.store import _compressor  # at call time: store.py imports this module

        group.create_array("failed_tiles", shape=tuple(shape), chunks=tuple(chunk), dtype="bool",
                           fill_value=False, compressors=_compressor(), dimension_names=("y", "x"))

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
        return self._block_messages("errors")

    @property
    def tile_errors(self) -> dict[tuple[int, int], str]:
        """Error message (the first bad tile's) of every block with failed tiles."""
        return self._block_messages("tile_errors")

    def _block_messages(self, key: str) -> dict[tuple[int, int], str]:
        raw = self._meta_group.attrs.get(key, {})
        return {tuple(int(v) for v in k.split(",")): msg for k, msg in raw.items()}

    def block_has_failed_tiles(self, block_index: tuple[int, int]) -> bool:
        """Whether block ``block_index`` was written with undecodable tiles (a rerun retries it)."""
        rs, cs = self.block_slices(block_index)
        return bool(self._failed_tiles[rs, cs].any())

    def _write_failed_tiles(self, block_index: tuple[int, int], rs: slice, cs: slice,
                            failed_tiles: np.ndarray | None, tile_error: str | None) -> None:
        """Store block ``block_index``'s failed-tile mask (bool, the block's shape; None: none failed)
        and its ``tile_error`` message; a clean rewrite clears what an earlier attempt recorded."""
        by, bx = (int(v) for v in block_index)
        shape = (rs.stop - rs.start, cs.stop - cs.start)
        bad = np.zeros(shape, bool) if failed_tiles is None else np.asarray(failed_tiles, dtype=bool)
        if bad.shape != shape:
            raise ValueError(f"block {tuple(block_index)} needs a failed-tile mask of shape {shape}, "
                             f"got {bad.shape}")
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
            errors = dict(self._meta_group.attrs.get(key, {}))
            if error is None:
                if f"{by},{bx}" not in errors:
                    return
                errors.pop(f"{by},{bx}", None)
            else:
                errors[f"{by},{bx}"] = error
            self._meta_group.attrs[key] = errors
