"""The part of :class:`~wsi_cmaf.output.store.HeatmapStore` that keeps a run's inputs for resuming.

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
