"""torch Datasets over manifests (one image file per row) and packed patch stores.

Samples are ``(image, label)`` — or ``(image, label, index)`` with ``return_index=True`` —
and, for a multi-task run (``task_labels``), one more element ``{task: label}`` with the labels of
the secondary tasks (-1 = this sample has none). ``image`` is float32 (3, H, W) with values in
[0, 255] (uint8 converted, not scaled), the convention shared with ``wsi_cmaf.stain`` and the
inference preprocessor. ``transform`` is any callable on that tensor; batch augmentation
(``augment.BatchAugment``) is meant to run in the training loop instead.

A multi-view store read with ``views=True`` gives ``image = {"views": [(3, S_v, S_v)] per view,
"missing": bool (V,)}``; :func:`collate_views` batches those into a
:class:`~wsi_cmaf.models.multiview.ViewBatch`, the input of a multi-view model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from wsi_cmaf.errors import DataError
from wsi_cmaf.models.multiview import ViewBatch
from wsi_cmaf.train.data.geometry import decide_geometry, load_image
from wsi_cmaf.train.data.imbalance import ResampleReport, resample_to_ratio
from wsi_cmaf.train.data.manifest import SPLITS, Manifest, read_manifest, task_label_array
from wsi_cmaf.train.data.patchstore import PatchStore

logger = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]


def _to_tensor(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).float()


class ManifestDataset(Dataset):
    """Images listed in a manifest (optionally one split), decoded with Pillow on access.

    ``task_labels``: ``{task: int labels (N,)}`` of secondary tasks, aligned with the rows (after
    ``split``); each sample then ends with ``{task: label}`` (-1 = no label for that task).

    ``patch_size`` is the model's tile (``patch_size_pixels``), ``image_size`` its input size.
    ``geometry`` (:mod:`~wsi_cmaf.train.data.geometry`): ``"tile"`` yields ``patch_size`` tiles,
    ``"resize"`` resizes images larger than a tile whole to ``image_size`` (BreakHis), ``"auto"``
    picks one from the images' sizes; ``self.geometry`` records the choice.
    """

    def __init__(self, manifest: Manifest, split: str | None = None, *, transform: Transform | None = None,
                 patch_size: int = 50, return_index: bool = False,
                 task_labels: Mapping[str, np.ndarray] | None = None, image_size: int | None = None,
                 geometry: str = "auto") -> None:
        self.manifest = manifest.split(split) if split else manifest
        self.paths = self.manifest.paths()
        self.labels = self.manifest.labels()
        self.patient_ids = self.manifest.frame["patient_id"].astype(str).to_numpy()
        self.transform, self.patch_size, self.return_index = transform, int(patch_size), return_index
        self.image_size = int(image_size or patch_size)
        self.geometry = decide_geometry(self.paths, self.patch_size, geometry)
        self.task_labels: dict[str, np.ndarray] | None = None
        if task_labels is not None:
            self.task_labels = {t: np.asarray(v, dtype=np.int64) for t, v in task_labels.items()}
            bad = {t: len(v) for t, v in self.task_labels.items() if len(v) != len(self.labels)}
            if bad:
                raise DataError(f"task labels {bad} do not match the {len(self.labels)} manifest rows")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        try:
            img = _to_tensor(load_image(self.paths[i], self.patch_size, geometry=self.geometry,
                                        out_size=self.image_size))
        except OSError as exc:
            raise DataError(f"cannot read training image {self.paths[i]}: {exc}") from exc
        if self.transform is not None:
            img = self.transform(img)
        label = int(self.labels[i])
        sample = (img, label, i) if self.return_index else (img, label)
        if self.task_labels is None:
            return sample
        return (*sample, {t: int(v[i]) for t, v in self.task_labels.items()})


class PatchStoreDataset(Dataset):
    """Rows of a packed patch store (optionally one split or an explicit row subset).

    Defines ``__getitems__`` so a DataLoader fetches a whole batch with one store read.
    ``views=True`` returns every view of a multi-view store (see the module docstring);
    ``transform`` then applies to each view.
    """

    def __init__(self, store: PatchStore | str | Path, split: str | None = None, *,
                 rows: np.ndarray | None = None, transform: Transform | None = None,
                 return_index: bool = False, in_memory: bool = False, views: bool = False) -> None:
        self.store = store if isinstance(store, PatchStore) else PatchStore(store, in_memory=in_memory)
        self.rows = np.asarray(rows, dtype=np.int64) if rows is not None else self.store.indices(split)
        self.labels = self.store.labels[self.rows]
        self.patient_ids = self.store.patient_ids[self.rows]
        self.transform, self.return_index = transform, return_index
        if views and self.store.views is None:
            raise DataError(f"{self.store.path} has no context views: a multi-view model needs a store "
                            "built with them (`wsi-cmaf manifest slide-patches --view MPP:SIZE`)")
        self.views = bool(views)

    def __len__(self) -> int:
        return len(self.rows)

    def _tensor(self, img: np.ndarray) -> torch.Tensor:
        t = _to_tensor(img)
        return self.transform(t) if self.transform is not None else t

    def _sample(self, img: np.ndarray | tuple[list[np.ndarray], np.ndarray], i: int):
        x: torch.Tensor | dict[str, object]
        if isinstance(img, tuple):
            views, missing = img
            x = {"views": [self._tensor(v) for v in views], "missing": torch.from_numpy(np.asarray(missing, bool))}
        else:
            x = self._tensor(img)
        label = int(self.labels[i])
        return (x, label, i) if self.return_index else (x, label)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        if self.views:
            views, missing = self.store.read_views(rows)
            return [self._sample(([v[k] for v in views], missing[k]), i) for k, i in enumerate(indices)]
        return [self._sample(img, i) for img, i in zip(self.store.read(rows), indices)]


def collate_views(samples: list) -> list:
    """``default_collate`` whose first element, a dict of views and mask, becomes a ViewBatch."""
    batch = default_collate(samples)
    first = batch[0]
    return [ViewBatch(list(first["views"]), first["missing"]), *batch[1:]]


def anchor_image(x: torch.Tensor | dict | ViewBatch) -> torch.Tensor:
    """The tile itself: ``x`` for a single-view sample or batch, view 0 of a multi-view one."""
    if isinstance(x, ViewBatch):
        return x.anchor
    return x["views"][0] if isinstance(x, dict) else x


class ChunkShuffleSampler(Sampler[int]):
    """Shuffles while keeping reads local: chunks are shuffled, then rows are shuffled
    within pools of ``pool_chunks`` chunks, so a batch touches about that many chunks.

    ``store_rows``: the store row of each dataset position (``PatchStoreDataset.rows``).
    Call ``set_epoch`` each epoch for a new, still seeded, order.
    """

    def __init__(self, store_rows: np.ndarray, chunk_patches: int, *, pool_chunks: int = 8, seed: int = 0) -> None:
        self.store_rows = np.asarray(store_rows)
        self.chunk_patches, self.pool_chunks, self.seed, self.epoch = int(chunk_patches), int(pool_chunks), seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.store_rows)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        chunk_of = self.store_rows // self.chunk_patches
        chunks = rng.permutation(np.unique(chunk_of))
        for start in range(0, len(chunks), self.pool_chunks):
            members = np.flatnonzero(np.isin(chunk_of, chunks[start:start + self.pool_chunks]))
            yield from rng.permutation(members).tolist()


@dataclass
class DataBundle:
    """What :func:`build_dataloaders` made: loaders and datasets per split, train class counts."""

    loaders: dict[str, DataLoader]
    datasets: dict[str, Dataset]
    class_counts: dict[int, int]
    resample_report: ResampleReport | None = None
    info: dict = field(default_factory=dict)


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def build_dataloaders(
    source: str | Path,
    *,
    batch_size: int = 256,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    imbalance_ratio: str | None = None,
    train_transform: Transform | None = None,
    eval_transform: Transform | None = None,
    in_memory: bool = False,
    return_index: bool = False,
    check_images: str = "exists",
    num_classes: int = 2,
    tasks: Mapping[str, Sequence[str]] | None = None,
    views: int | None = None,
    patch_size: int = 50,
    image_size: int | None = None,
    image_geometry: str = "auto",
    pin_memory: bool = False,
) -> DataBundle:
    """Train/val/test DataLoaders from a manifest CSV or a patch store directory.

    ``imbalance_ratio`` (e.g. ``"95:5"``) undersamples the TRAINING split only
    (:func:`~wsi_cmaf.train.data.imbalance.resample_to_ratio`, same seed). Training order is
    seeded (store: :class:`ChunkShuffleSampler`; manifest: a seeded generator).
    ``tasks``: ``{secondary task: class names}``; each reads the manifest column of its name
    (:func:`~wsi_cmaf.train.data.manifest.task_label_array`) and samples gain ``{task: label}``.
    ``pin_memory``: batches in page-locked memory (CUDA runs: their copies do not block the host).
    ``views``: the number of views a multi-view model takes; the source must then be a patch store
    with exactly that many, and batches carry a :class:`~wsi_cmaf.models.multiview.ViewBatch`
    (``info["views"]`` records the store's view specs).
    ``patch_size`` / ``image_size`` / ``image_geometry``: how manifest images reach the model
    (:class:`ManifestDataset`); decided once for every split, recorded in ``info["image_geometry"]``.
    """
    source = Path(source)
    if views is not None and views > 1:
        if not _is_store(source):
            raise DataError(f"{source}: a {views}-view model trains on a patch store with context views; build one "
                            "from annotated slides with `wsi-cmaf manifest slide-patches --view MPP:SIZE`")
    else:
        views = None
    classes = tuple(range(num_classes))
    if tasks and _is_store(source):
        raise DataError(f"{source}: a patch store carries no labels for the task(s) {sorted(tasks)}; "
                        "train multi-task models on a manifest CSV with a column per task")
    make: Callable[[np.ndarray, Callable | None], Dataset]
    if _is_store(source):
        store = PatchStore(source, in_memory=in_memory)
        frame = pd.DataFrame({"label": store.labels, "split": store.split_codes, "row": np.arange(len(store))})
        frame["split"] = frame["split"].map(dict(enumerate(SPLITS))).fillna("none")
        bad = sorted(set(np.unique(store.labels).tolist()) - set(classes))
        if bad:
            raise DataError(f"{source}: labels {bad} are outside the class set {list(classes)}")
        if views is not None and len(store.views or ()) != views:
            raise DataError(f"{source}: the model takes {views} views but the store has "
                            f"{len(store.views) if store.views else 'no context'} views ({store.views}); rebuild "
                            "the store with the model's views or change model.kwargs.num_views")
        make = lambda rows, tf: PatchStoreDataset(store, rows=rows, transform=tf,  # noqa: E731
                                                  return_index=return_index, views=views is not None)
    else:
        manifest = read_manifest(source, classes=classes, check_images=check_images)
        frame = manifest.frame.assign(row=np.arange(len(manifest)))
        geometry = decide_geometry(manifest.paths(), patch_size, image_geometry)
        shape: dict[str, Any] = {"patch_size": patch_size, "image_size": image_size, "geometry": geometry}
        if tasks:
            task_arrays = {t: task_label_array(manifest.frame, t, names, str(source)) for t, names in tasks.items()}
            make = lambda rows, tf: ManifestDataset(  # noqa: E731
                Manifest(manifest.frame.iloc[rows].reset_index(drop=True), manifest.root),
                transform=tf, return_index=return_index, task_labels={t: a[rows] for t, a in task_arrays.items()},
                **shape)
        else:
            make = lambda rows, tf: ManifestDataset(  # noqa: E731
                Manifest(manifest.frame.iloc[rows].reset_index(drop=True), manifest.root),
                transform=tf, return_index=return_index, **shape)
    report = None
    if imbalance_ratio:
        frame, report = resample_to_ratio(frame, imbalance_ratio, seed=seed, split="train")
    datasets: dict[str, Dataset] = {}
    loaders: dict[str, DataLoader] = {}
    for split in SPLITS:
        rows = frame.loc[frame["split"] == split, "row"].to_numpy()
        if len(rows) == 0:
            raise DataError(f"{source}: split {split!r} is empty")
        ds = make(rows, train_transform if split == "train" else eval_transform)
        datasets[split] = ds
        kwargs: dict[str, Any] = {"num_workers": num_workers, "persistent_workers": num_workers > 0,
                                  "pin_memory": pin_memory, "collate_fn": collate_views if views is not None else None}
        if split == "train":
            if isinstance(ds, PatchStoreDataset):
                sampler = ChunkShuffleSampler(ds.rows, ds.store.chunk_patches, seed=seed)
                loaders[split] = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=False, **kwargs)
            else:
                gen = torch.Generator().manual_seed(seed)
                loaders[split] = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen, **kwargs)
        else:
            loaders[split] = DataLoader(ds, batch_size=eval_batch_size or batch_size, shuffle=False, **kwargs)
    train_labels = datasets["train"].labels  # type: ignore[attr-defined]
    counts = {c: int((train_labels == c).sum()) for c in classes}
    logger.info("train class counts %s%s", counts, f" after {report}" if report else "")
    for task, values in (getattr(datasets["train"], "task_labels", None) or {}).items():
        labelled = int((values >= 0).sum())
        if labelled == 0:
            logger.warning("task %r: no training sample carries a label; its head will not learn", task)
        logger.info("task %r: %d of %d training samples labelled", task, labelled, len(values))
    info: dict = {"source": str(source)}
    if not _is_store(source):
        info["image_geometry"] = geometry
    if views is not None:
        info["views"] = store.views
    return DataBundle(loaders, datasets, counts, report, info)
