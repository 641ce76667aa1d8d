"""Training of the slide-level models (:mod:`wsi_cmaf.slidelevel.fusion`) and their saved form.

Protocol (the same for every kind, so baselines compare fairly): AdamW, binary cross-entropy,
mini-batches of patients, a fixed number of epochs, the clinical encoder and the tile
standardisation fitted on the training patients only. In training each bag is subsampled to at
most ``max_tiles`` tiles (speed; at prediction every tile is used).

Saved model directory: ``slide_model.json`` (model config, clinical encoder with its training
statistics, training config) and ``slide_model.pt`` (state dict).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_cmaf.errors import DataError, ModelError
from wsi_cmaf.slidelevel.clinical import ClinicalEncoder
from wsi_cmaf.slidelevel.data import PatientData
from wsi_cmaf.slidelevel.fusion import SlideModel
from wsi_cmaf.slidelevel.mil import pad_bags

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "slide_model.json", "slide_model.pt"


@dataclass
class SlideTrainConfig:
    """Hyper-parameters shared by every kind."""

    epochs: int = 40
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    hidden: int = 64
    attn_dim: int = 32
    heads: int = 4
    dropout: float = 0.1
    modality_dropout: float = 0.3
    max_tiles: int = 512
    seed: int = 0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread: these models are tiny, and on a loaded machine torch's thread
    pool made a training step ~15x slower (measured: 15 ms vs 220 ms per step on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batch(data: PatientData, idx: np.ndarray, rng: np.random.Generator | None, max_tiles: int | None):
    bags = []
    for i in idx:
        b = data.bags[i]
        if rng is not None and max_tiles and len(b) > max_tiles:
            b = b[rng.choice(len(b), max_tiles, replace=False)]
        bags.append(b)
    x, mask = pad_bags(bags)
    clin = torch.as_tensor(data.clin[idx]) if data.clin is not None else None
    present = torch.as_tensor(data.present[idx]) if data.present is not None else None
    return x, mask, clin, present


def fit_slide_model(kind: str, train: PatientData, cfg: SlideTrainConfig,
                    clin_groups: list[tuple[int, int]] | None = None) -> SlideModel:
    """Train a :class:`SlideModel` of ``kind`` on the labelled patients of ``train``."""
    labelled = np.flatnonzero(train.labels >= 0)
    if len(labelled) < 2 or len(np.unique(train.labels[labelled])) < 2:
        raise DataError(f"training needs labelled patients of both classes; got labels "
                        f"{np.bincount(train.labels[labelled], minlength=2).tolist() if len(labelled) else []}")
    if kind != "image" and train.clin is None:
        raise DataError(f"a {kind!r} model needs clinical data: give a clinical table and its schema")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    in_dim = int(train.bags[0].shape[1])
    model = SlideModel(kind, in_dim, clin_groups, hidden=cfg.hidden, attn_dim=cfg.attn_dim, heads=cfg.heads,
                       dropout=cfg.dropout, modality_dropout=cfg.modality_dropout)
    if model.mil is not None:
        model.mil.set_standardisation(np.concatenate([train.bags[i] for i in labelled]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    with _one_thread():
        _train_epochs(model, opt, train, labelled, rng, cfg, kind)
    return model.eval()


def _train_epochs(model: SlideModel, opt: torch.optim.Optimizer, train: PatientData, labelled: np.ndarray,
                  rng: np.random.Generator, cfg: SlideTrainConfig, kind: str) -> None:
    y_all = torch.as_tensor(train.labels, dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(cfg.epochs):
        order = rng.permutation(labelled)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x, mask, clin, present = _batch(train, idx, rng, cfg.max_tiles)
            logits, _ = model(x, mask, clin, present)
            loss = loss_fn(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        logger.debug("%s epoch %d: loss %.4f", kind, epoch, total / len(order))


@torch.inference_mode()
def predict_patients(model: SlideModel, data: PatientData, *, batch_size: int = 16,
                     present: np.ndarray | None = None) -> dict[str, Any]:
    """``prob`` (n,), ``modality`` (n,) 1 = clinical used, ``attention``: list of (N_i,) arrays (or None).

    ``present`` overrides ``data.present`` (e.g. to simulate missing clinical data).
    """
    model.eval()
    pres = data.present if present is None else np.asarray(present, bool)
    with _one_thread():
        return _predict(model, data, pres, batch_size)


def _predict(model: SlideModel, data: PatientData, pres: np.ndarray | None, batch_size: int) -> dict[str, Any]:
    probs, modality, attention = [], [], []
    for start in range(0, len(data.bags), batch_size):
        idx = np.arange(start, min(len(data.bags), start + batch_size))
        x, mask, clin, _ = _batch(data, idx, None, None)
        p = torch.as_tensor(pres[idx]) if pres is not None else None
        logits, aux = model(x, mask, clin, p)
        probs.append(torch.sigmoid(logits).numpy())
        modality.append(aux["modality"].numpy())
        if "attention" in aux:
            attention += [aux["attention"][k, : len(data.bags[i])].numpy() for k, i in enumerate(idx)]
    return {"prob": np.concatenate(probs), "modality": np.concatenate(modality),
            "attention": attention or None}


def save_slide_model(out: str | Path, model: SlideModel, encoder: ClinicalEncoder | None,
                     cfg: SlideTrainConfig, extra: dict | None = None) -> Path:
    """Write ``slide_model.json`` + ``slide_model.pt`` into ``out``; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format": "wsi-cmaf-slide-model", "version": 1, "model": model.config(),
           "clinical": encoder.to_dict() if encoder is not None else None, "train": asdict(cfg), **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    return out


def load_slide_model(path: str | Path) -> tuple[SlideModel, ClinicalEncoder | None, dict]:
    """The model, its clinical encoder (None for image-only) and the saved document."""
    path = Path(path)
    try:
        doc = json.loads((path / CONFIG_FILE).read_text())
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: not a slide model folder ({CONFIG_FILE} + {WEIGHTS_FILE}): {exc}") from exc
    if doc.get("format") != "wsi-cmaf-slide-model":
        raise ModelError(f"{path / CONFIG_FILE} is not a wsi-cmaf slide model")
    model = SlideModel.from_config(doc["model"])
    model.load_state_dict(state)
    encoder = ClinicalEncoder.from_dict(doc["clinical"]) if doc.get("clinical") else None
    return model.eval(), encoder, doc
