"""Turn a :class:`~wsi_cmaf.train.config.DataConfig` into loaders and a batch preprocessor.

Batch preprocessing mirrors inference exactly (``wsi_cmaf.preprocess.TilePreprocessor``):
Macenko normalisation on the native patch (one stain fit per patient, as inference fits one
per slide), then — in training only — augmentation, then bicubic resize to the model's input
size and ImageNet channel normalisation. The resize/normalise step *is* ``TilePreprocessor``,
so a trained model sees at inference the same input distribution it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from wsi_cmaf.errors import ConfigError, DataError
from wsi_cmaf.models.multiview import ViewBatch
from wsi_cmaf.preprocess import TilePreprocessor
from wsi_cmaf.train.config import DataConfig, ModelSection
from wsi_cmaf.train.data.augment import AugmentConfig, BatchAugment, PatientStainNormalizer
from wsi_cmaf.train.data.datasets import DataBundle, anchor_image, build_dataloaders
from wsi_cmaf.train.data.manifest import BREAKHIS_SUBTYPE_ORDER, read_manifest, write_manifest

logger = logging.getLogger(__name__)


def synthetic_source(data: DataConfig, output_dir: Path) -> Path:
    """Generate (once) the synthetic patch store described by ``data.synthetic``; return its path.

    The folder name contains a hash of the generator settings, so runs with the same settings
    share one store and changed settings never reuse a stale one.
    """
    from wsi_cmaf.train.data.synthetic_patches import SyntheticPatchConfig, write_synthetic_dataset

    try:
        cfg = SyntheticPatchConfig(**(data.synthetic or {}))
    except TypeError as exc:
        raise ConfigError(f"data.synthetic: {exc}") from exc
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    base = Path(data.synthetic_dir) if data.synthetic_dir else output_dir / "synthetic_data"
    folder = base / f"synthetic-{key}"
    store = folder / "patches.zarr"
    if not (store / "zarr.json").is_file():
        logger.info("generating synthetic patches %s into %s", cfg, folder)
        tmp = base / f".synthetic-{key}.tmp"
        written = write_synthetic_dataset(tmp, cfg, formats=("zarr",))
        if not written.get("store"):
            raise DataError("synthetic generator wrote no patch store")
        if folder.exists():  # another process won the race; keep theirs
            return store
        tmp.rename(folder)
    return store


def subtype_manifest(source: Path, class_names: list[str], output_dir: Path) -> Path:
    """Write a copy of a BreakHis manifest whose ``label`` is the subtype index in ``class_names``."""
    manifest = read_manifest(source, check_images="none")
    frame = manifest.frame.copy()
    if "subtype" not in frame.columns:
        raise DataError(f"{source}: data.target 'subtype' needs a 'subtype' column")
    index = {name: i for i, name in enumerate(class_names)}
    bad = [f"line {i + 2}: subtype {s!r} not in model.class_names"
           for i, s in enumerate(frame["subtype"]) if s not in index]
    if bad:
        raise DataError(f"{source}: subtypes outside the class set {class_names}", bad)
    frame["binary_label"] = frame["label"]
    frame["label"] = frame["subtype"].map(index).astype(np.int64)
    frame["path"] = [str(p) for p in manifest.paths()]  # absolute: the copy lives elsewhere
    out = output_dir / "manifest_subtype.csv"
    write_manifest(frame, out)
    return out


def build_data(data: DataConfig, model: ModelSection, output_dir: Path, seed: int,
               pin_memory: bool = False) -> DataBundle:
    """Loaders (train/val/test, with sample indices) for a run, imbalance-resampled as configured.

    ``pin_memory`` (for CUDA runs) has the loaders hand out page-locked batches, whose copies to
    the device do not block the host.

    With ``model.tasks``, samples also carry the secondary tasks' labels (``{task: label}``).
    """
    if data.synthetic is not None:
        source = synthetic_source(data, output_dir)
    else:
        source = Path(str(data.source))
        if not source.exists():
            raise DataError(f"data.source {source} does not exist")
    if data.target == "subtype":
        if list(model.class_names) != list(BREAKHIS_SUBTYPE_ORDER):
            logger.warning("class_names %s differ from the BreakHis order %s", model.class_names,
                           list(BREAKHIS_SUBTYPE_ORDER))
        source = subtype_manifest(source, list(model.class_names), output_dir)
    return build_dataloaders(
        source, batch_size=data.batch_size, eval_batch_size=data.eval_batch_size,
        num_workers=data.num_workers, seed=seed, imbalance_ratio=data.imbalance_ratio,
        in_memory=data.in_memory, return_index=True, check_images=data.check_images,
        num_classes=model.num_classes, tasks=model.extra_tasks() or None,
        views=model.num_views if model.num_views > 1 else None,
        patch_size=model.patch_size_pixels, image_size=model.input_size, image_geometry=data.image_geometry,
        pin_memory=pin_memory,
    )


def _uint8_hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()


def fit_patient_stain(bundle: DataBundle, per_patient: int, seed: int) -> PatientStainNormalizer:
    """One Macenko fit per patient of every split, from up to ``per_patient`` of its patches.

    Unsupervised and per patient (labels are never looked at), like inference's per-slide fit.
    """
    rng = np.random.default_rng(seed)
    images, pids = [], []
    for ds in bundle.datasets.values():
        patient_ids = np.asarray(ds.patient_ids).astype(str)  # type: ignore[attr-defined]
        for pid in np.unique(patient_ids):
            rows = np.flatnonzero(patient_ids == pid)
            if len(rows) > per_patient:
                rows = np.sort(rng.choice(rows, per_patient, replace=False))
            for i in rows:
                images.append(_uint8_hwc(anchor_image(ds[int(i)][0])))  # the tile, not its context
                pids.append(pid)
    normalizer = PatientStainNormalizer(seed=seed).fit(np.stack(images), np.asarray(pids))
    if normalizer.failed:
        logger.warning("%d patient(s) without a stain fit (used unnormalised)", len(normalizer.failed))
    return normalizer


class BatchPipeline(nn.Module):
    """float (B, 3, H, W) in [0, 255] + patient ids -> model input, the inference way."""

    def __init__(self, model: ModelSection, augment: BatchAugment | None,
                 stain: PatientStainNormalizer | None) -> None:
        super().__init__()
        self.stain = stain
        self.augment = augment
        self.resize_norm = TilePreprocessor(model.input_size, tuple(model.mean), tuple(model.std), "bicubic")

    def forward(self, x: torch.Tensor | ViewBatch, patient_ids: list[str] | np.ndarray,
                train: bool) -> torch.Tensor | ViewBatch:
        """Stain-normalise, augment when ``train``, resize and normalise.

        A :class:`ViewBatch` goes through view by view with the same random draws for every view
        (the generator is rewound), so a tile and its context get the same flips, turns, colour
        and stain changes, as one piece of glass would; every view uses its patient's stain fit.
        """
        if isinstance(x, ViewBatch):
            gen = self.augment.generator if self.augment is not None else None
            state = gen.get_state() if gen is not None else None
            out = []
            for view in x.views:
                if gen is not None and state is not None:
                    gen.set_state(state)
                out.append(self._one(view, patient_ids, train))
            return ViewBatch(out, x.missing)
        return self._one(x, patient_ids, train)

    def _one(self, x: torch.Tensor, patient_ids: list[str] | np.ndarray, train: bool) -> torch.Tensor:
        if self.stain is not None:
            x = self.stain(x, list(patient_ids))
        if train and self.augment is not None:
            self.augment.train()
            x = self.augment(x)
        # TilePreprocessor takes NHWC (uint8 or float): hand it the float batch in that layout.
        return self.resize_norm(x.permute(0, 2, 3, 1))


def build_pipeline(data: DataConfig, model: ModelSection, bundle: DataBundle, seed: int,
                   device: torch.device) -> BatchPipeline:
    """The batch pipeline of a run (per-patient stain fits when the model wants Macenko)."""
    stain = None
    if model.stain_normalization == "macenko":
        stain = fit_patient_stain(bundle, data.stain_patches_per_patient, seed)
    augment = BatchAugment(AugmentConfig(**data.augment_kwargs), seed=seed) if data.augment else None
    if augment is not None and augment.config.stain_transfer_p > 0:
        if stain is None:  # the batches' stain must be known to deconvolve them
            raise ConfigError("augment stain_transfer_p needs the model's stain_normalization: macenko")
        train_ds = bundle.datasets.get("train")  # references from the training patients only
        train_pids = np.asarray(getattr(train_ds, "patient_ids", [])).astype(str)
        refs = stain.fits(train_pids)
        if not refs:
            raise ConfigError("augment stain_transfer_p: no training patient has a stain fit to transfer")
        augment.set_stain_references(stain.target, refs)
        logger.info("stain transfer: %d training patients' stains, p = %g", len(refs),
                    augment.config.stain_transfer_p)
    return BatchPipeline(model, augment, stain).to(device)


def batch_patient_ids(bundle: DataBundle, split: str, index: torch.Tensor) -> np.ndarray:
    """Patient id of each sample of a batch (datasets are built with ``return_index=True``)."""
    ds = bundle.datasets[split]
    return np.asarray(ds.patient_ids)[index.cpu().numpy()]  # type: ignore[attr-defined]


def split_frame(bundle: DataBundle, split: str) -> pd.DataFrame:
    """Per-sample metadata of a split (label, patient, and manifest extras such as magnification)."""
    ds = bundle.datasets[split]
    manifest = getattr(ds, "manifest", None)
    if manifest is not None:
        return manifest.frame.reset_index(drop=True)
    return pd.DataFrame({"label": np.asarray(ds.labels), "patient_id": np.asarray(ds.patient_ids)})  # type: ignore[attr-defined]
