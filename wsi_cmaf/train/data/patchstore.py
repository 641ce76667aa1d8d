"""Packed patch store: many small patches in one Zarr v3 group instead of one PNG each.

Layout (group attributes ``format = "wsi-cmaf-patchstore"``, ``version = 1``)::

    images       uint8 (N, H, W, 3), chunks (chunk_patches, H, W, 3), zstd
    labels       int64 (N,)
    patient      int32 (N,)   index into attrs["patients"]
    split        int8  (N,)   index into attrs["splits"] (train, val, test); -1 = none

A multi-view store (patches cut from slides with context views, :mod:`.slide_patches`) adds::

    views/<v>    uint8 (N, S_v, S_v, 3) for v = 1..V-1, chunked as ``images``
    view_missing bool  (N, V)  True where view v of a patch ran off the slide (pixels = fill)

with ``attrs["views"] = [{"mpp", "size"}, ...]``, view 0 being ``images`` (the tile itself).
Single-view readers ignore the extra arrays, so such a store also trains single-view models.

Reading a random batch costs one decompression per touched chunk, so training samplers
should draw batches from a few chunks at a time (see ``datasets.ChunkShuffleSampler``);
``PatchStore(in_memory=True)`` loads everything once when it fits in RAM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from wsi_cmaf.errors import DataError, ManifestError
from wsi_cmaf.zarr_nodes import attrs_dict, member_array, read

logger = logging.getLogger(__name__)

FORMAT = "wsi-cmaf-patchstore"
VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
#: 256 patches of 50x50x3 = 1.9 MB per chunk: large enough to compress well, small
#: enough that a batch drawn from a few chunks decodes little it does not use.
DEFAULT_CHUNK = 256


def write_patch_store(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    patient_ids: np.ndarray,
    splits: np.ndarray | None = None,
    *,
    chunk_patches: int = DEFAULT_CHUNK,
    attrs: dict | None = None,
    overwrite: bool = True,
    views: Sequence[dict] | None = None,
    view_images: Sequence[np.ndarray] | None = None,
    view_missing: np.ndarray | None = None,
) -> Path:
    """Write in-memory patches (N, H, W, 3) uint8 with their labels, patients and splits.

    ``views`` ({"mpp", "size"} per view, view 0 = ``images``) with ``view_images`` (one
    (N, S_v, S_v, 3) array per view 1..V-1) and ``view_missing`` (N, V) make a multi-view store.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    n = len(images)
    writer = PatchStoreWriter(path, n, images.shape[1:3], chunk_patches=chunk_patches,
                              attrs=attrs, overwrite=overwrite, views=views)
    writer.write(0, images, labels, patient_ids, splits, view_images=view_images, view_missing=view_missing)
    return writer.close()


def _take(arr: Any, idx: np.ndarray, unique: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Rows ``idx`` of an in-memory or zarr array; from zarr each touched chunk is decoded once.

    ``unique``: ``np.unique(idx, return_inverse=True)`` when the caller already has it.
    """
    if isinstance(arr, np.ndarray):
        return arr[idx]
    uniq, inverse = unique if unique is not None else np.unique(idx, return_inverse=True)
    if uniq.size == 0:
        return np.empty((0, *arr.shape[1:]), np.uint8)
    return arr.get_orthogonal_selection((uniq,))[inverse]


class PatchStoreWriter:
    """Incremental writer: create once with N and patch size, then ``write`` slices in order."""

    def __init__(self, path: str | Path, n: int, patch_hw: tuple[int, int], *,
                 chunk_patches: int = DEFAULT_CHUNK, attrs: dict | None = None, overwrite: bool = True,
                 views: Sequence[dict] | None = None) -> None:
        import zarr
        from zarr.codecs import ZstdCodec

        self.path = Path(path)
        if self.path.exists() and not overwrite:
            from wsi_cmaf.errors import OutputExistsError

            raise OutputExistsError(f"patch store already exists: {self.path}")
        self.n = int(n)
        h, w = (int(v) for v in patch_hw)
        self.group = zarr.open_group(str(self.path), mode="w")
        chunk = max(1, min(int(chunk_patches), max(self.n, 1)))
        small = (max(1, min(self.n, 1 << 16)),)
        self.images = self.group.create_array("images", shape=(self.n, h, w, 3), dtype="uint8",
                                              chunks=(chunk, h, w, 3), compressors=ZstdCodec(level=3))
        self.labels = self.group.create_array("labels", shape=(self.n,), dtype="int64", chunks=small)
        self.patient = self.group.create_array("patient", shape=(self.n,), dtype="int32", chunks=small)
        self.split = self.group.create_array("split", shape=(self.n,), dtype="int8", chunks=small, fill_value=-1)
        self.views = _check_store_views(views, (h, w)) if views is not None else None
        self.view_arrays = []
        if self.views is not None:
            for v, spec in enumerate(self.views[1:], start=1):
                s = spec["size"]
                self.view_arrays.append(self.group.create_array(
                    f"views/{v}", shape=(self.n, s, s, 3), dtype="uint8", chunks=(chunk, s, s, 3),
                    compressors=ZstdCodec(level=3)))
            self.view_missing = self.group.create_array("view_missing", shape=(self.n, len(self.views)),
                                                        dtype="bool", chunks=(small[0], len(self.views)))
        self._patients: dict[str, int] = {}
        self._written = 0
        self._attrs = dict(attrs or {})

    def write(self, start: int, images: np.ndarray, labels: np.ndarray, patient_ids: np.ndarray,
              splits: np.ndarray | None = None, *, view_images: Sequence[np.ndarray] | None = None,
              view_missing: np.ndarray | None = None) -> None:
        """Write rows ``start:start+len(images)`` (chunk-aligned starts write fastest).

        A multi-view store also needs ``view_images`` (views 1..V-1) and ``view_missing`` (k, V).
        """
        k = len(images)
        if not (len(labels) == len(patient_ids) == k) or (splits is not None and len(splits) != k):
            raise DataError("images, labels, patient_ids and splits must have the same length")
        stop = start + k
        if stop > self.n:
            raise DataError(f"rows {start}:{stop} exceed the store size {self.n}")
        if (self.views is None) != (view_images is None and view_missing is None):
            raise DataError("view_images and view_missing go with a store created with views, and only there")
        if self.views is not None:
            extra = list(view_images or [])
            missing = np.asarray(view_missing, dtype=bool)
            if len(extra) != len(self.views) - 1 or missing.shape != (k, len(self.views)):
                raise DataError(f"a {len(self.views)}-view store needs {len(self.views) - 1} view_images arrays "
                                f"and view_missing of shape {(k, len(self.views))}; got {len(extra)} arrays and "
                                f"{missing.shape}")
            for arr, dst in zip(extra, self.view_arrays):
                if tuple(np.shape(arr)) != (k, *dst.shape[1:]):
                    raise DataError(f"view array {dst.name}: expected {(k, *dst.shape[1:])}, got {np.shape(arr)}")
                dst[start:stop] = arr
            self.view_missing[start:stop] = missing
        codes = np.array([self._patients.setdefault(str(p), len(self._patients)) for p in patient_ids], np.int32)
        self.images[start:stop] = images
        self.labels[start:stop] = np.asarray(labels, dtype=np.int64)
        self.patient[start:stop] = codes
        if splits is not None:
            lookup = {s: i for i, s in enumerate(SPLIT_NAMES)}
            self.split[start:stop] = np.array([lookup.get(str(s), -1) for s in splits], np.int8)
        self._written += k

    def close(self) -> Path:
        """Write the group attributes; returns the store path."""
        if self._written != self.n:
            raise DataError(f"patch store {self.path}: wrote {self._written} of {self.n} rows")
        patients = sorted(self._patients, key=self._patients.__getitem__)
        self.group.attrs.update({"format": FORMAT, "version": VERSION, "n": self.n,
                                 "patch_shape": list(self.images.shape[1:3]), "patients": patients,
                                 "splits": list(SPLIT_NAMES), **self._attrs,
                                 **({"views": self.views} if self.views is not None else {})})
        return self.path


def _check_store_views(views: Sequence[dict], patch_hw: tuple[int, int]) -> list[dict]:
    """``views`` as [{"mpp": float, "size": int}] with view 0 the store's own patches."""
    out = []
    for i, v in enumerate(views):
        try:
            mpp, size = float(v["mpp"]), int(v["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"views[{i}] must be {{mpp, size}}, got {v!r}") from exc
        if not (mpp > 0 and size > 0):
            raise DataError(f"views[{i}] needs mpp > 0 and size > 0, got {v!r}")
        out.append({"mpp": mpp, "size": size})
    if len(out) < 2:
        raise DataError(f"a multi-view store needs at least 2 views, got {len(out)}")
    if (out[0]["size"], out[0]["size"]) != tuple(patch_hw):
        raise DataError(f"view 0 is the store's own patches ({patch_hw[0]}x{patch_hw[1]} px), "
                        f"but views[0] has size {out[0]['size']}")
    return out


def load_patch(path: str | Path, size: int = 50, pad_value: int = 255) -> np.ndarray:
    """Decode a tile-sized image to (size, size, 3) uint8 RGB (smaller ones padded white).

    A larger image is an :class:`~wsi_cmaf.errors.ImageGeometryError`, never a crop; whole images
    go through :func:`wsi_cmaf.train.data.geometry.load_image` with ``geometry="resize"``.
    """
    from wsi_cmaf.train.data.geometry import load_image

    return load_image(path, size, geometry="tile", pad_value=pad_value)


def build_patch_store(manifest, path: str | Path, *, patch_size: int = 50,
                      chunk_patches: int = DEFAULT_CHUNK, workers: int = 2, pad_value: int = 255) -> Path:
    """Pack every image of a :class:`~wsi_cmaf.train.data.manifest.Manifest` into a store (row order kept).

    Images larger than ``patch_size`` (BreakHis) are resized whole to it
    (:mod:`wsi_cmaf.train.data.geometry`); pass the model's input size as ``patch_size`` for them.
    """
    from wsi_cmaf.train.data.geometry import decide_geometry, load_image

    frame = manifest.frame
    paths = manifest.paths()
    # images larger than the store's patches are resized whole to them, never cropped
    geometry = decide_geometry(paths, patch_size, "auto")
    writer = PatchStoreWriter(path, len(frame), (patch_size, patch_size), chunk_patches=chunk_patches,
                              attrs={"source": "manifest", "manifest_root": str(manifest.root)})
    bad: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decoding releases the GIL
        for start in range(0, len(frame), chunk_patches):
            stop = min(start + chunk_patches, len(frame))
            futures = [pool.submit(load_image, p, patch_size, geometry=geometry, pad_value=pad_value)
                       for p in paths[start:stop]]
            batch = np.empty((stop - start, patch_size, patch_size, 3), np.uint8)
            for i, fut in enumerate(futures):
                try:
                    batch[i] = fut.result()
                except OSError as exc:
                    bad.append(f"line {start + i + 2}: cannot decode {paths[start + i]} ({exc})")
            rows = frame.iloc[start:stop]
            writer.write(start, batch, rows["label"].to_numpy(), rows["patient_id"].to_numpy(),
                         rows["split"].to_numpy())
    if bad:
        raise ManifestError("images could not be packed", bad)
    return writer.close()


class PatchStore:
    """Read access to a packed store; ``read(indices)`` returns (k, H, W, 3) uint8 in that order."""

    def __init__(self, path: str | Path, *, in_memory: bool = False) -> None:
        import zarr

        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise DataError(f"not a patch store: {self.path} ({exc})") from exc
        attrs = attrs_dict(self.group)
        if attrs.get("format") != FORMAT:
            raise DataError(f"{self.path} is not a {FORMAT} (format={attrs.get('format')!r})")
        self.attrs = attrs
        self._images = member_array(self.group, "images")
        self.labels: np.ndarray = read(member_array(self.group, "labels"))
        self.patient_codes: np.ndarray = read(member_array(self.group, "patient"))
        self.split_codes: np.ndarray = read(member_array(self.group, "split"))
        self.patients: list[str] = list(attrs["patients"])
        self.chunk_patches = int(self._images.chunks[0])
        self._memory = read(self._images) if in_memory else None
        #: [{"mpp", "size"}] per view of a multi-view store (view 0 = the patches), else None
        self.views: list[dict] | None = attrs.get("views")
        self._view_arrays: list[Any] = []  # zarr arrays, or numpy arrays when in memory
        self._view_missing: np.ndarray | None = None
        if self.views is not None:
            try:
                self._view_arrays = [member_array(self.group, f"views/{v}") for v in range(1, len(self.views))]
                self._view_missing = read(member_array(self.group, "view_missing"))
            except KeyError as exc:
                raise DataError(f"{self.path}: attrs declare {len(self.views)} views but an array is "
                                f"missing ({exc}); rebuild the store") from exc
            if in_memory:
                self._view_arrays = [read(a) for a in self._view_arrays]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def patch_shape(self) -> tuple[int, int]:
        """(H, W) of every patch."""
        return int(self._images.shape[1]), int(self._images.shape[2])

    @property
    def patient_ids(self) -> np.ndarray:
        """Patient id per row (str array)."""
        return np.asarray(self.patients, dtype=object)[self.patient_codes].astype(str)

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of one split (all rows when None)."""
        if split is None:
            return np.arange(len(self))
        if split not in SPLIT_NAMES:
            raise DataError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        return np.flatnonzero(self.split_codes == SPLIT_NAMES.index(split))

    def _checked(self, indices: np.ndarray | list[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"patch index out of range 0..{len(self) - 1}")
        return idx

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Patches at ``indices`` (any order, repeats allowed); each touched chunk is decoded once."""
        return _take(self._memory if self._memory is not None else self._images, self._checked(indices))

    def read_views(self, indices: np.ndarray | list[int]) -> tuple[list[np.ndarray], np.ndarray]:
        """Every view of the patches at ``indices``: ``([(k, S_v, S_v, 3)] per view, missing (k, V))``."""
        if self.views is None:
            raise DataError(f"{self.path} has no context views; build it with views "
                            "(wsi_cmaf.train.data.slide_patches, or `wsi-cmaf manifest slide-patches --view`)")
        idx = self._checked(indices)
        uniq, inverse = np.unique(idx, return_inverse=True)
        base = self._memory if self._memory is not None else self._images
        out = [_take(arr, idx, (uniq, inverse)) for arr in (base, *self._view_arrays)]
        assert self._view_missing is not None
        return out, self._view_missing[idx]
