"""Compact, committable scores of the controlled imbalance experiment, and its rederivation.

Per seed, ``scores/seed_<s>.npz`` holds every run's validation and test logit margins
z = l_malignant − l_benign as float16 (compressed; ~0.5 MB per seed at 12 arms × 3 ratios), with
``seed_<s>.json`` beside it (train counts, steps, timings); ``scores/labels.npz`` holds the label,
patient and split of every patch (no pixels). The report is computed from exactly these stored
numbers (P = sigmoid(z) in float64), so :func:`rederive` reproduces ``runs.csv``, ``results.md``
and every number of ``results.json`` from the repository alone, without the cached images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from wsi_cmaf.errors import DataError
from wsi_cmaf.train.paper.controlled_config import ControlledConfig, Data

SCORES_DIR = "scores"


def seed_path(out: Path, seed: int) -> Path:
    """Where one seed's scores live in an experiment folder."""
    return Path(out) / SCORES_DIR / f"seed_{seed}.npz"


def save_seed(path: Path, result: dict[str, Any]) -> None:
    """Write one seed's logit margins (float16 npz) and its counts/timings (json), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {f"{key}|{part}": np.asarray(v, np.float32).astype(np.float16)
              for key, d in result["scores"].items() for part, v in d.items()}
    meta = {k: v for k, v in result.items() if k != "scores"}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_seed(path: Path) -> dict[str, Any]:
    """One seed's scores as P(malignant) = sigmoid(stored float16 margin) in float64, plus its metadata."""
    with np.load(path, allow_pickle=False) as z:
        scores: dict[str, dict[str, np.ndarray]] = {}
        for name in z.files:
            key, part = name.rsplit("|", 1)
            scores.setdefault(key, {})[part] = 1.0 / (1.0 + np.exp(-z[name].astype(np.float64)))
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return {"scores": scores, **meta}


def save_labels(out: Path, data: Data) -> Path:
    """``scores/labels.npz``: labels, patients and splits of every patch (what the report needs)."""
    path = Path(out) / SCORES_DIR / "labels.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, labels=data.labels.astype(np.int8), patients=data.patients.astype(str),
                        split=data.split.astype(str))
    return path


def load_labels(out: Path) -> Data:
    """The experiment's patches without pixels (``images`` is an empty array)."""
    path = Path(out) / SCORES_DIR / "labels.npz"
    if not path.is_file():
        raise DataError(f"{path} is missing: the folder holds no stored scores to rederive from")
    with np.load(path, allow_pickle=False) as z:
        return Data(np.empty((0, 0, 0, 3), np.uint8), z["labels"].astype(np.int64), z["patients"], z["split"])


def stored_config(out: Path) -> ControlledConfig:
    """The :class:`ControlledConfig` an experiment folder's ``config.json`` records."""
    settings = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))["config"]
    tuples = ("split_patients", "ratios", "arms", "seeds")
    fields: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in settings.items()}
    return ControlledConfig(**fields)


def rederive(out: Path, into: Path | None = None) -> dict[str, Any]:
    """Recompute every table, CI and figure of an experiment folder from its stored scores.

    Writes into ``into`` (default: ``out`` itself) and returns the summary. Nothing is trained.
    """
    from wsi_cmaf.train.paper.controlled_report import write_report

    out = Path(out)
    cfg = stored_config(out)
    data = load_labels(out)
    missing = [s for s in cfg.seeds if not seed_path(out, s).is_file()]
    if missing:
        raise DataError(f"{out / SCORES_DIR}: no stored scores for seed(s) {missing}")
    results = {s: load_seed(seed_path(out, s)) for s in cfg.seeds}
    previous_path = out / "results.json"
    previous = json.loads(previous_path.read_text(encoding="utf-8")) if previous_path.is_file() else {}
    target = Path(into) if into is not None else out
    target.mkdir(parents=True, exist_ok=True)
    return write_report(cfg, data, results, target, wall_seconds=previous.get("wall_seconds", float("nan")),
                        run_provenance=previous.get("provenance"))
