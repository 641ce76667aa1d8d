"""The part of :class:`~wsi_cmaf.output.store.HeatmapStore` that keeps a run's inputs for resuming
(and the optional tile-embeddings array).

A resumed run reuses the tissue stage's facts, the stain fit and the overlay's background picture
from the store instead of recomputing them (the tissue mask and the tiles' tissue fractions are
stored by ``HeatmapStore.write_tissue`` / ``write_tissue_mask``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsi_cmaf.output._json import jsonable


class RunInputsMixin:
    """Stored run inputs; mixed into HeatmapStore (uses its ``_meta_group``, ``_lock`` and helpers)."""

    _meta_group: Any
    _lock: Any
    _check_writable: Any
    _put_meta_array: Any
    _emb: Any
    embedding_dim: int | None
    grid_shape: tuple[int, int]
    path: Any

    @staticmethod
    def _create_embeddings(root: Any, shape: tuple[int, int], chunk: tuple[int, int], dim: int) -> None:
        # float16: tile embeddings are compared by similarity and pooled, not read to 7 digits;
        # half the bytes of float32, which matters at D ~ 500 per tile
        from wsi_cmaf.output.store import _compressor

        root.create_array("embeddings", shape=(*shape, dim), chunks=(*chunk, dim), dtype="float16",
                          fill_value=np.nan, compressors=_compressor(), dimension_names=("y", "x", "feature"))

    def _write_embeddings(self, block_index: tuple[int, int], rs: slice, cs: slice, emb: np.ndarray) -> None:
        if self._emb is None:
            raise ValueError(f"{self.path} has no embeddings array (create it with embedding_dim)")
        want = (rs.stop - rs.start, cs.stop - cs.start, int(self.embedding_dim))
        if emb.shape != want:
            raise ValueError(f"block {tuple(block_index)} needs embeddings of shape {want}, got {emb.shape}")
        self._emb[rs, cs] = np.asarray(emb, dtype=np.float16)

    def embeddings(self) -> np.ndarray | None:
        """float16 (rows, cols, D) tile embeddings (NaN where none), or None when not stored."""
        return None if self._emb is None else np.asarray(self._emb[...])

    def write_inside_fraction(self, inside: np.ndarray) -> None:
        """Store each tile's share of area inside the slide (float32, grid shape; < 1 marks a
        partial edge tile, padded with white beyond the slide: see the "edge_tiles" attribute)."""
        self._check_writable()
        self._put_meta_array("inside_fraction", np.asarray(inside, dtype=np.float32), tuple(self.grid_shape))

    def inside_fraction(self) -> np.ndarray | None:
        """float32 (rows, cols) share of each tile inside the slide, or None (stores from before
        partial edge tiles were analysed: they hold whole tiles only)."""
        arr = self._meta_group.get("inside_fraction")
        return None if arr is None else np.asarray(arr[...])

    def write_background(self, rgb: np.ndarray) -> None:
        """Store the overlay's background picture (RGB uint8 of the whole slide) for resumed runs."""
        self._check_writable()
        self._put_meta_array("overlay_background", np.asarray(rgb, dtype=np.uint8), None, dims=("bg_y", "bg_x", "rgb"))

    def background(self) -> np.ndarray | None:
        """The overlay background stored by :meth:`write_background`, or None."""
        arr = self._meta_group.get("overlay_background")
        return None if arr is None else np.asarray(arr[...])

    def write_inputs(self, facts: dict[str, Any]) -> None:
        """Merge ``facts`` (JSON-able) into the run's stored inputs (see :meth:`inputs`)."""
        self._check_writable()
        with self._lock:  # one JSON document with the "errors" attributes: serialise updates
            merged = {**self._meta_group.attrs.get("inputs", {}), **jsonable(facts)}
            self._meta_group.attrs["inputs"] = merged

    def inputs(self) -> dict[str, Any]:
        """What the pipeline stored to resume without recomputing (tissue stage facts, stain fit).

        The store's identity check guarantees they belong to the same slide, model and settings.
        """
        return dict(self._meta_group.attrs.get("inputs", {}))
