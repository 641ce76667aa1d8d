"""Train-and-save and predict workflows behind ``wsi-cmaf train-slide`` / ``predict-slide``.

Prediction writes one row per patient (``patient, prob, prediction, modality, n_tiles, label``):
``modality`` says "image+clinical" when clinical data were used and "image-only" when the patient
has none (the fused model then runs its image path exactly). The MIL attention of each slide is
written into its store as the NGFF image ``mil_attention`` (:func:`~wsi_cmaf.slidelevel.bags.write_attention_map`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_cmaf.errors import DataError
from wsi_cmaf.slidelevel.bags import write_attention_map
from wsi_cmaf.slidelevel.clinical import ClinicalEncoder, ClinicalSchema
from wsi_cmaf.slidelevel.data import (
    PatientData,
    attach_clinical,
    embedding_sources,
    load_patients,
    read_clinical,
    read_manifest,
)
from wsi_cmaf.slidelevel.train import (
    SlideTrainConfig,
    fit_slide_model,
    load_slide_model,
    predict_patients,
    save_slide_model,
)

logger = logging.getLogger(__name__)


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    ok = y >= 0
    return float(roc_auc_score(y[ok], p[ok])) if len(np.unique(y[ok])) == 2 else None


def modality_names(kind: str, used: np.ndarray) -> list[str]:
    """Per patient: what the prediction rests on."""
    if kind == "image":
        return ["image-only"] * len(used)
    if kind == "clinical":
        return ["clinical" if u else "none (prior)" for u in used]
    return ["image+clinical" if u else "image-only" for u in used]


def prediction_table(kind: str, data: PatientData, out: dict[str, Any], threshold: float = 0.5) -> pd.DataFrame:
    """The per-patient prediction table."""
    return pd.DataFrame({"patient": data.patients, "prob": out["prob"],
                         "prediction": (out["prob"] >= threshold).astype(int),
                         "modality": modality_names(kind, out["modality"] > 0),
                         "n_tiles": [len(b) for b in data.bags], "label": data.labels, "split": data.split})


def write_attention(data: PatientData, attention: list[np.ndarray] | None, model_dir: str | Path | None = None) -> int:
    """Split each patient's attention back onto its slides' tiles and write one map per store."""
    if attention is None:
        return 0
    n = 0
    for refs, a in zip(data.refs, attention):
        for ref in refs:
            write_attention_map(ref.store, ref.rows, ref.cols, a[ref.start:ref.stop],
                                attrs={"slide_model": str(model_dir) if model_dir else None,
                                       "note": "weights sum to 1 over the patient's tiles (all its slides)"})
            n += 1
    return n


def train_slide(manifest: str | Path, out: str | Path, *, kind: str | None = None, clinical: str | Path | None = None,
                schema: str | Path | None = None, config: SlideTrainConfig | None = None,
                write_attention_maps: bool = True, encoder_name: str | None = None) -> dict[str, Any]:
    """Train on the manifest's ``split == "train"`` patients, save the model into ``out``, predict every
    patient (``out/predictions.csv``, attention maps in the stores) and return the metrics
    (also ``out/metrics.json``: AUROC on train and, when present, test patients)."""
    cfg = config or SlideTrainConfig()
    kind = kind or ("fusion" if clinical is not None else "image")
    if (clinical is None) != (schema is None):
        raise DataError("give both the clinical table (--clinical) and its schema (--schema), or neither")
    rows = read_manifest(manifest, encoder_name)
    sources = embedding_sources(rows)
    data = load_patients(rows)
    encoder = None
    if clinical is not None:
        table = read_clinical(clinical)
        train_ids = [p for p, s in zip(data.patients, data.split) if s == "train"]
        assert schema is not None  # given together with the clinical table (checked above)
        encoder = ClinicalEncoder(ClinicalSchema.load(schema)).fit(table.reindex(train_ids).reset_index(drop=True))
        attach_clinical(data, table, encoder)
    is_train = np.array([s == "train" for s in data.split])
    groups = [(g.start, g.stop) for _, g in encoder.groups] if encoder is not None else None
    model = fit_slide_model(kind, data.subset(np.flatnonzero(is_train)), cfg, groups)
    out = Path(out)
    save_slide_model(out, model, encoder, cfg, {"trained_on": str(Path(manifest).resolve()), "embeddings": sources})
    pred = predict_patients(model, data)
    table_out = prediction_table(kind, data, pred)
    table_out.to_csv(out / "predictions.csv", index=False)
    metrics = {"kind": kind, "n_train": int(is_train.sum()), "n_test": int((~is_train).sum()),
               "auroc_train": _auroc(data.labels[is_train], pred["prob"][is_train]),
               "auroc_test": _auroc(data.labels[~is_train], pred["prob"][~is_train]) if (~is_train).any() else None,
               "image_only_patients": int((table_out["modality"] == "image-only").sum())}
    if write_attention_maps:
        metrics["attention_maps"] = write_attention(data, pred["attention"], out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("slide model %s trained: %s", kind, metrics)
    return metrics


def predict_slide(model_dir: str | Path, manifest: str | Path, *, clinical: str | Path | None = None,
                  out_csv: str | Path | None = None, write_attention_maps: bool = True,
                  encoder_name: str | None = None) -> pd.DataFrame:
    """Predict every patient of ``manifest`` with the saved slide model in ``model_dir``.

    Patients without clinical data (no table, no row, or every value missing) get the image-only
    prediction and ``modality == "image-only"``.
    """
    model, encoder, doc = load_slide_model(model_dir)
    rows = read_manifest(manifest, encoder_name)
    _check_sources(doc.get("embeddings"), embedding_sources(rows), model_dir)
    data = load_patients(rows)
    if encoder is not None:
        attach_clinical(data, read_clinical(clinical) if clinical is not None else None, encoder)
    pred = predict_patients(model, data)
    table = prediction_table(model.kind, data, pred)
    if write_attention_maps:
        write_attention(data, pred["attention"], model_dir)
    if out_csv is not None:
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False)
    return table


def _check_sources(trained: list[dict] | None, given: list[dict], model_dir: str | Path) -> None:
    """A slide model only reads embeddings of the models/encoders (same weights) it was trained on:
    another encoder of the same width would give plausible-looking but meaningless predictions."""
    if not trained:  # a model saved before sources were recorded
        return
    known = {(t["model"], t["weights_sha256"]) for t in trained}
    other = [g for g in given if (g["model"], g["weights_sha256"]) not in known]
    if other:
        names = ", ".join(f"{t['model']} ({str(t['weights_sha256'])[:12]})" for t in trained)
        got = ", ".join(f"{g['model']} ({str(g['weights_sha256'])[:12]})" for g in other)
        raise DataError(f"the slide model {model_dir} was trained on embeddings of {names}; these stores hold "
                        f"{got}: embed the slides with the same encoder and weights (or pass --encoder)")
