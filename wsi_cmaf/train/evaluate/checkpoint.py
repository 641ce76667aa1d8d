"""Evaluation of a trained model on a split: the trainer's final test report and ``wsi-cmaf evaluate``.

Both use the training pipeline's evaluation preprocessing (per-patient Macenko fit when the model's
config asks for it, bicubic resize, channel normalisation), so numbers match what training reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from wsi_cmaf.device import resolve_device
from wsi_cmaf.errors import ConfigError, DataError, ModelError
from wsi_cmaf.models import ModelConfig, load_model
from wsi_cmaf.train.config import ModelSection
from wsi_cmaf.train.data.datasets import (
    DataBundle,
    ManifestDataset,
    PatchStoreDataset,
    _is_store,
    anchor_image,
    collate_views,
)
from wsi_cmaf.train.data.geometry import decide_geometry
from wsi_cmaf.train.data.manifest import SPLITS, Manifest, read_manifest
from wsi_cmaf.train.data.setup import BatchPipeline, fit_patient_stain
from wsi_cmaf.train.engine.state import json_safe, write_json
from wsi_cmaf.train.engine.tasks import primary_view
from wsi_cmaf.train.evaluate.metrics import mcnemar_test
from wsi_cmaf.train.evaluate.predict import full_report, predict

logger = logging.getLogger(__name__)

EVAL_SPLITS = (*SPLITS, "all")


def split_report(model: nn.Module, loader: Iterable, prepare: Any, *, device: torch.device,
                 autocast_dtype: torch.dtype | None, class_names: Sequence[str], positive_class: int,
                 meta: pd.DataFrame | None, patient_ids: Sequence[str], out_dir: Path, n_boot: int,
                 seed: int, prefix: str) -> dict[str, Any]:
    """Predict over ``loader`` and build the full report (patient-grouped bootstrap CIs, figures)."""
    probs, labels, idx = predict(model, loader, prepare, device, autocast_dtype)  # type: ignore[arg-type]
    meta_rows = meta.iloc[idx].reset_index(drop=True) if meta is not None else None
    groups = np.asarray(patient_ids)[idx]
    return full_report(probs, labels, list(class_names), out_dir, positive_class=positive_class, groups=groups,
                       meta=meta_rows, n_boot=n_boot, seed=seed, prefix=prefix)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder means its exported ``model/``; a model folder or ``.safetensors`` file is used as is."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"checkpoint {p} does not exist (give a model folder, a run folder or a .safetensors)")
    if p.is_dir() and not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        return p / "model"
    if p.is_dir() and (p / "checkpoints").is_dir() and not (p / "model").is_dir():
        raise ModelError(f"{p} is a training run that has not finished (no model/ yet); "
                         "resume it with `wsi-cmaf train --config ... --resume`")
    return p


def _subtype_labels(frame: pd.DataFrame, class_names: Sequence[str], where: str) -> pd.DataFrame:
    """Replace ``label`` by the subtype's index in ``class_names``; list every row that cannot be mapped."""
    if "subtype" not in frame.columns:
        raise DataError(f"{where}: --target subtype needs a 'subtype' column (BreakHis manifests have one)")
    index = {name: i for i, name in enumerate(class_names)}
    bad = [f"line {i + 2}: subtype {s!r} is not one of the model's classes"
           for i, s in zip(frame.index, frame["subtype"]) if s not in index]
    if bad:
        raise DataError(f"{where}: subtypes outside the class set {list(class_names)}", bad)
    out = frame.copy()
    out["binary_label"] = out["label"]
    out["label"] = out["subtype"].map(index).astype(np.int64)
    return out


def saved_views(module: nn.Module, mc: ModelConfig) -> list[dict] | None:
    """A saved multi-view model's views in a patch store's form (``[{"mpp", "size"}]``), None for
    one view; checked as the slide engine checks them (:func:`wsi_cmaf.preprocess.model_views`)."""
    from wsi_cmaf.preprocess import model_views
    from wsi_cmaf.slide.views import views_attrs

    views = model_views(module, mc, getattr(mc, "architecture", "model"))
    return None if views is None else views_attrs(views)


def eval_dataset(source: str | Path, split: str, target: str, class_names: Sequence[str],
                 check_images: str = "exists", views: list[dict] | None = None, *, patch_size: int = 50,
                 image_size: int | None = None, image_geometry: str = "auto") -> tuple[Dataset, pd.DataFrame]:
    """Dataset (returning indices) and per-row metadata of one split (or ``all``) of a manifest/store.

    ``views``: a multi-view model's views; the source must then be a patch store with these views.
    ``patch_size`` / ``image_size`` / ``image_geometry``: the model's tile and input size and how
    manifest images reach it (:mod:`wsi_cmaf.train.data.geometry`; BreakHis images are resized whole).
    The geometry is decided on the whole manifest, before the split is taken.
    """
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    source = Path(source)
    is_store = _is_store(source)
    if views is not None and not is_store:
        raise DataError(f"{source}: a multi-view model is evaluated on a patch store with its views {views}; "
                        "build one with `wsi-cmaf manifest slide-patches --view MPP:SIZE`")
    if is_store:
        from wsi_cmaf.train.data.patchstore import PatchStore

        if target == "subtype":
            raise ConfigError(f"{source}: patch stores carry no subtype; evaluate 8-class models on a manifest")
        store = PatchStore(source)
        rows = store.indices(None if split == "all" else split)
        if len(rows) == 0:
            raise DataError(f"{source}: split {split!r} is empty")
        bad = sorted(set(np.unique(store.labels[rows]).tolist()) - set(range(len(class_names))))
        if bad:
            raise DataError(f"{source}: labels {bad} are outside the class set {list(class_names)}")
        if views is not None and store.views != views:
            raise DataError(f"{source}: the model takes views {views} but the store holds "
                            f"{store.views or 'no context views'}; rebuild the store with the model's views")
        store_ds = PatchStoreDataset(store, rows=rows, return_index=True, views=views is not None)
        return store_ds, pd.DataFrame({"label": store_ds.labels, "patient_id": store_ds.patient_ids})
    require = () if split == "all" else (split,)
    manifest = read_manifest(source, check_images=check_images, require_splits=require)
    frame = manifest.frame
    if target == "subtype":
        frame = _subtype_labels(frame, class_names, str(source))
    if split != "all":
        frame = frame[frame["split"] == split]
    frame = frame.reset_index(drop=True)
    geometry = decide_geometry(manifest.paths(), patch_size, image_geometry)
    ds = ManifestDataset(Manifest(frame, manifest.root), return_index=True, patch_size=patch_size,
                         image_size=image_size, geometry=geometry)
    return ds, frame


def evaluate_checkpoint(checkpoint: str | Path, manifest: str | Path, *, split: str = "test",
                        out_dir: str | Path | None = None, target: str = "auto", device: str = "auto",
                        batch_size: int = 256, n_boot: int = 1000, seed: int = 0, check_images: str = "exists",
                        stain_patches_per_patient: int = 64, progress: bool = True,
                        compare: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Evaluate an exported model on a manifest/patch store; writes metrics.json + confusion PNG.

    ``target``: ``label`` (benign/malignant), ``subtype`` (BreakHis 8-class) or ``auto`` (subtype
    when the model has more than two classes). ``compare``: a second checkpoint, predicted on the
    same samples (with its own preprocessing); the report gains ``mcnemar``, the exact McNemar test
    of the two models' hard predictions. Returns (report, output folder).
    """
    model_dir = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    model, mc = load_model(model_dir, map_location="cpu")
    own_views = saved_views(model, mc)
    model = primary_view(model).to(dev)  # a multi-task model is evaluated on its primary task
    if target == "auto":
        target = "subtype" if mc.num_classes > 2 else "label"
    if target not in ("label", "subtype"):
        raise ConfigError(f"target must be 'label', 'subtype' or 'auto', got {target!r}")
    if target == "label" and mc.num_classes != 2:
        raise ConfigError(f"the model has {mc.num_classes} classes {mc.class_names}; "
                          "benign/malignant labels need a 2-class model (use --target subtype)")
    other = None
    if compare is not None:  # loaded once: its views decide the dataset when A has none
        other_dir = resolve_checkpoint(compare)
        model_b, mc_b = load_model(other_dir, map_location="cpu")
        other = (other_dir, model_b, mc_b, saved_views(model_b, mc_b))
    views = own_views if own_views is not None or other is None else other[3]
    ds, meta = eval_dataset(manifest, split, target, mc.class_names, check_images, views,
                            patch_size=mc.patch_size_pixels, image_size=mc.input_size)
    out = Path(out_dir) if out_dir else model_dir.parent / f"eval_{Path(manifest).stem}_{split}"
    out.mkdir(parents=True, exist_ok=True)
    pipeline = eval_pipeline(mc, ds, stain_patches_per_patient, seed, dev)
    loader = eval_loader(ds, batch_size)
    pids = np.asarray(ds.patient_ids).astype(str)  # type: ignore[attr-defined]

    def prepare(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # a single-view model on a multi-view store (for --compare) sees the tile itself, view 0
        return pipeline(x if own_views is not None else anchor_image(x), pids[idx.cpu().numpy()], train=False)

    bar = tqdm(loader, disable=not progress, desc="evaluate", unit="batch", dynamic_ncols=True)
    probs, labels, idx = predict(model, bar, prepare, dev, name=str(model_dir))
    meta_rows = meta.iloc[idx].reset_index(drop=True) if meta is not None else None
    report = full_report(probs, labels, list(mc.class_names), out, positive_class=mc.positive_class,
                         groups=pids[idx], meta=meta_rows, n_boot=n_boot, seed=seed, prefix=split)
    report.update({"split": split, "target": target, "manifest": str(manifest), "model_dir": str(model_dir),
                   "weights_note": mc.weights_note, "bootstrap": n_boot})
    if other is not None:
        report["mcnemar"] = _compare_with(other, mc, ds, pids, probs, labels, idx, batch_size=batch_size,
                                          per_patient=stain_patches_per_patient, seed=seed, device=dev,
                                          progress=progress)
    write_json(out / "metrics.json", report)
    return json_safe(report), out


def hard_predictions(probs: np.ndarray, positive_class: int) -> np.ndarray:
    """Predicted classes as the reports count them: P(positive) >= 0.5 for two classes, else argmax."""
    if probs.shape[1] == 2:
        return np.where(probs[:, positive_class] >= 0.5, positive_class, 1 - positive_class)
    return probs.argmax(1)


def _compare_with(other: tuple[Path, nn.Module, ModelConfig, list[dict] | None], mc: ModelConfig, ds: Dataset,
                  pids: np.ndarray, probs: np.ndarray, labels: np.ndarray, idx: np.ndarray, *, batch_size: int,
                  per_patient: int, seed: int, device: torch.device, progress: bool) -> dict[str, Any]:
    """McNemar test of the evaluated model (A) against ``other`` = (folder, model, config, views)
    of checkpoint B, on the same rows."""
    other_dir, model_b, mc_b, b_views = other
    if list(mc_b.class_names) != list(mc.class_names) or mc_b.positive_class != mc.positive_class:
        raise ConfigError(f"--compare {other_dir}: classes {list(mc_b.class_names)} (positive "
                          f"{mc_b.positive_class}) differ from {list(mc.class_names)} (positive {mc.positive_class})")
    model_b = primary_view(model_b).to(device)
    pipeline = eval_pipeline(mc_b, ds, per_patient, seed, device)  # B's own stain/resize/normalisation
    if b_views is not None and getattr(ds, "store", None) is not None and ds.store.views != b_views:  # type: ignore[attr-defined]
        raise DataError(f"--compare {other_dir}: it takes views {b_views}, the store holds {ds.store.views}")  # type: ignore[attr-defined]

    def prepare(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return pipeline(x if b_views is not None else anchor_image(x), pids[i.cpu().numpy()], train=False)

    loader = eval_loader(ds, batch_size)
    bar = tqdm(loader, disable=not progress, desc="evaluate (compare)", unit="batch", dynamic_ncols=True)
    probs_b, _labels_b, idx_b = predict(model_b, bar, prepare, device)
    # pair the rows by dataset index, whatever order each pass produced them in
    order_a, order_b = np.argsort(idx, kind="stable"), np.argsort(idx_b, kind="stable")
    if not np.array_equal(idx[order_a], idx_b[order_b]):
        raise DataError("--compare: the two passes did not see the same samples")
    result = mcnemar_test(labels[order_a], hard_predictions(probs[order_a], mc.positive_class),
                          hard_predictions(probs_b[order_b], mc.positive_class))
    return {"model_a": "this model", "model_b": str(other_dir), "test": "exact binomial McNemar (two-sided)",
            **result}


def eval_loader(ds: Dataset, batch_size: int) -> DataLoader:
    """Ordered batches of ``ds``; a multi-view dataset's batches carry a ViewBatch."""
    multi = bool(getattr(ds, "views", False))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_views if multi else None)


def eval_pipeline(mc: ModelConfig, ds: Dataset, per_patient: int, seed: int, device: torch.device) -> BatchPipeline:
    """The evaluation batch pipeline for an exported model's config (stain fit on ``ds``'s patients)."""
    section = ModelSection(name=mc.architecture, class_names=list(mc.class_names), positive_class=mc.positive_class,
                           input_size=mc.input_size, mean=tuple(mc.mean), std=tuple(mc.std),  # type: ignore[arg-type]
                           stain_normalization=mc.stain_normalization)
    stain = None
    if mc.stain_normalization == "macenko":
        stain = fit_patient_stain(DataBundle({}, {"eval": ds}, {}), per_patient, seed)
    return BatchPipeline(section, None, stain).to(device)
