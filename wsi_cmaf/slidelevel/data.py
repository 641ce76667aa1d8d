"""Manifests of stores -> one bag of tile embeddings per patient, with labels and clinical rows.

Manifest CSV columns: ``store`` (path of a heatmap store made with embeddings, or of a slide's
store folder together with an encoder; relative paths are relative to the manifest), optionally
``encoder`` (the stored encoder to read, ``<store>/encoders/<name>``; ``--encoder`` sets it for
every row), ``label`` (0/1; empty for unlabelled slides at prediction time), and
optionally ``patient`` (slides of one patient are pooled into one bag; default: one patient per
row) and ``split`` (``train``/``test``; default: all ``train``). Clinical CSV: one row per patient,
a ``patient`` column and the schema's variables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_cmaf.errors import ManifestError
from wsi_cmaf.slidelevel.bags import read_embeddings
from wsi_cmaf.slidelevel.clinical import ClinicalEncoder

logger = logging.getLogger(__name__)


@dataclass
class TileRef:
    """Where a run of bag rows came from: ``rows``/``cols`` of ``store``, bag rows [start, stop)."""

    store: str
    rows: np.ndarray
    cols: np.ndarray
    start: int
    stop: int


@dataclass
class PatientData:
    """One bag per patient (all its slides' tiles), label (-1 = unknown), clinical encoding."""

    patients: list[str]
    bags: list[np.ndarray]
    labels: np.ndarray
    split: list[str]
    clin: np.ndarray | None = None
    present: np.ndarray | None = None
    refs: list[list[TileRef]] = field(default_factory=list)

    def subset(self, idx: np.ndarray) -> PatientData:
        """The patients at ``idx``."""
        idx = np.asarray(idx)
        return PatientData([self.patients[i] for i in idx], [self.bags[i] for i in idx], self.labels[idx],
                           [self.split[i] for i in idx], None if self.clin is None else self.clin[idx],
                           None if self.present is None else self.present[idx],
                           [self.refs[i] for i in idx] if self.refs else [])


def slide_stem(store: str | Path) -> str:
    """The slide name of a store path: ``s.zarr`` and ``s.zarr/encoders/<name>`` both give ``s``."""
    p = Path(store)
    if p.parent.name == "encoders" and p.parent.parent.name:
        p = p.parent.parent
    return p.stem


def read_manifest(path: str | Path, encoder: str | None = None) -> pd.DataFrame:
    """The manifest with absolute store paths and ``patient``/``split`` filled in.

    ``encoder`` (or an ``encoder`` column) points each row at that encoder's embedding store
    inside its slide's store folder (see :func:`wsi_cmaf.encoders.embed.find_encoder_store`)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"patient": str, "split": str})
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read slide manifest {path}: {exc}") from exc
    if "store" not in df:
        raise ManifestError(f"{path}: a slide manifest needs a 'store' column (and 'label' for training)")
    df = df.copy()
    df["store"] = [str(p if Path(p).is_absolute() else (path.parent / p)) for p in df["store"].astype(str)]
    if "patient" not in df:  # named after the slide, not after an encoder's sub-store
        df["patient"] = [slide_stem(s) for s in df["store"]]
    if encoder is not None or "encoder" in df:
        from wsi_cmaf.encoders.embed import find_encoder_store
        from wsi_cmaf.errors import OutputError

        names = [encoder] * len(df) if encoder is not None else df["encoder"].tolist()
        try:
            df["store"] = [str(find_encoder_store(s, None if pd.isna(n) or n == "" else str(n)))
                           for s, n in zip(df["store"], names)]
        except OutputError as exc:
            raise ManifestError(f"{path}: {exc}") from exc
    if "split" not in df:
        df["split"] = "train"
    if "label" not in df:
        df["label"] = np.nan
    return df


def read_clinical(path: str | Path) -> pd.DataFrame:
    """The clinical table indexed by patient id (values kept as read; the encoder parses them)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read clinical table {path}: {exc}") from exc
    if "patient" not in df:
        raise ManifestError(f"{path}: the clinical table needs a 'patient' column")
    if df["patient"].duplicated().any():
        dup = df.loc[df["patient"].duplicated(), "patient"].iloc[0]
        raise ManifestError(f"{path}: patient {dup!r} appears more than once; one row per patient")
    return df.set_index("patient")


def embedding_sources(manifest: pd.DataFrame) -> list[dict]:
    """The distinct models/encoders (name and weights SHA-256) whose embeddings the stores hold."""
    from wsi_cmaf.output.store import HeatmapStore

    seen: dict[tuple, dict] = {}
    for store in dict.fromkeys(manifest["store"]):
        st = HeatmapStore.open(store)
        key = (st.identity.get("model"), st.identity.get("weights_sha256"))
        seen.setdefault(key, {"model": key[0], "weights_sha256": key[1], "dim": st.embedding_dim})
    return list(seen.values())


def load_patients(manifest: pd.DataFrame) -> PatientData:
    """Read every store's embeddings and pool them per patient (manifest order of first appearance)."""
    order = list(dict.fromkeys(manifest["patient"].astype(str)))
    bags, labels, split, refs = [], [], [], []
    for pid in order:
        rows = manifest[manifest["patient"].astype(str) == pid]
        parts, prefs, start = [], [], 0
        for store in rows["store"]:
            tiles, x = read_embeddings(store)
            prefs.append(TileRef(store, tiles["row"].to_numpy(), tiles["col"].to_numpy(), start, start + len(x)))
            parts.append(x)
            start += len(x)
        if start == 0:
            raise ManifestError(f"patient {pid!r}: its stores hold no tile embeddings (no tissue?)")
        lab = pd.to_numeric(rows["label"], errors="coerce").dropna().unique()
        if len(lab) > 1:
            raise ManifestError(f"patient {pid!r}: its slides carry different labels {sorted(lab)}")
        bags.append(np.concatenate(parts))
        labels.append(int(lab[0]) if len(lab) else -1)
        split.append(str(rows["split"].iloc[0]))
        refs.append(prefs)
    return PatientData(order, bags, np.asarray(labels, np.int64), split, refs=refs)


def attach_clinical(data: PatientData, table: pd.DataFrame | None, encoder: ClinicalEncoder | None) -> PatientData:
    """Encode each patient's clinical row (all missing when the patient has none) into ``data``."""
    if encoder is None:
        return data
    if table is None:
        table = pd.DataFrame(index=pd.Index([], name="patient"))
    rows = table.reindex(data.patients)  # patients without a row: NaN everywhere -> all missing
    n_absent = int(rows.isna().all(axis=1).sum()) if len(rows.columns) else len(rows)
    if n_absent:
        logger.info("%d of %d patients have no clinical row: they are predicted from the image only",
                    n_absent, len(rows))
    data.clin, data.present = encoder.transform(rows.reset_index(drop=True))
    return data
