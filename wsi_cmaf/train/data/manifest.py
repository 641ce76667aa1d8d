"""Training/evaluation manifests: CSV format, validation, IDC and BreakHis builders, splits.

A manifest is a CSV with the required columns ``path, label, patient_id, split`` and the
optional ``subtype, magnification, source, x, y`` (see ``data_manifests/README.md``).
Relative paths are resolved against a root, by default the manifest's own folder.

Validation collects EVERY problem (bad rows, missing or corrupt images, patients in two
splits, empty splits) and raises one :class:`~wsi_cmaf.errors.ManifestError` listing them,
so a user fixes a manifest in one pass rather than one error per run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_cmaf.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "patient_id", "split")
OPTIONAL_COLUMNS = ("subtype", "magnification", "source", "x", "y")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
#: BreakHis histological subtypes by their file-name code (benign: A F PT TA; malignant: DC LC MC PC).
BREAKHIS_SUBTYPES = {
    "A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
BREAKHIS_SUBTYPE_ORDER = tuple(BREAKHIS_SUBTYPES.values())

_IDC_RE = re.compile(r"^(?P<patient>[^_/\\]+)_idx\d+_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<cls>[01])\.png$")
_BREAKHIS_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<sub>[A-Z]+)-(?P<year>\d+)-(?P<patient>[0-9A-Za-z]+)-(?P<mag>\d+)-(?P<seq>\d+)\.png$"
)


@dataclass
class Manifest:
    """A loaded manifest: ``frame`` (one row per image) and the ``root`` its paths are relative to."""

    frame: pd.DataFrame
    root: Path

    def __len__(self) -> int:
        return len(self.frame)

    def paths(self) -> list[Path]:
        """Absolute image paths, in row order."""
        return [resolve(self.root, p) for p in self.frame["path"]]

    def labels(self) -> np.ndarray:
        """Integer labels, in row order."""
        return self.frame["label"].to_numpy(dtype=np.int64)

    def split(self, name: str) -> Manifest:
        """Rows of one split (``train``, ``val`` or ``test``), index reset."""
        if name not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {name!r}")
        return Manifest(self.frame[self.frame["split"] == name].reset_index(drop=True), self.root)

    def counts(self) -> dict[str, dict[int, int]]:
        """``{split: {label: rows}}``."""
        grouped = self.frame.groupby(["split", "label"]).size()
        out: dict[str, dict[int, int]] = {}
        for (split, label), n in grouped.items():
            out.setdefault(str(split), {})[int(label)] = int(n)
        return out


def resolve(root: Path, path: str) -> Path:
    """``path`` if absolute, else ``root / path``."""
    p = Path(path)
    return p if p.is_absolute() else root / p


def _line(index: int) -> str:
    # CSV line number: header is line 1, first data row line 2.
    return f"line {index + 2}"


def validate_manifest(
    frame: pd.DataFrame,
    root: str | Path,
    *,
    classes: Iterable[int] = (0, 1),
    check_images: str = "exists",
    require_splits: Sequence[str] = SPLITS,
) -> None:
    """Raise :class:`ManifestError` listing ALL problems of ``frame``; return None when clean.

    ``check_images``: ``"none"``, ``"exists"`` (file is present and non-empty) or
    ``"decode"`` (fully decoded with Pillow; catches truncated/corrupt files, slower).
    """
    if check_images not in {"none", "exists", "decode"}:
        raise ConfigError(f"check_images must be 'none', 'exists' or 'decode', got {check_images!r}")
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing_cols:
        raise ManifestError(f"manifest lacks required column(s) {missing_cols}; has {list(frame.columns)}")
    frame = frame.reset_index(drop=True)
    root = Path(root)
    allowed = {int(c) for c in classes}
    problems: list[str] = []
    for i, row in enumerate(frame.itertuples(index=False)):
        where = _line(i)
        path = "" if pd.isna(row.path) else str(row.path).strip()
        if not path:
            problems.append(f"{where}: empty path")
        label = _as_int(row.label)
        if label is None or label not in allowed:
            problems.append(f"{where}: label {row.label!r} is not in the class set {sorted(allowed)} ({path})")
        if pd.isna(row.patient_id) or not str(row.patient_id).strip():
            problems.append(f"{where}: empty patient_id ({path})")
        if row.split not in SPLITS:
            problems.append(f"{where}: split {row.split!r} is not one of {list(SPLITS)} ({path})")
        if path and check_images != "none":
            problem = _image_problem(resolve(root, path), decode=check_images == "decode")
            if problem:
                problems.append(f"{where}: {problem}")
    dup = frame["path"][frame["path"].duplicated(keep=False)]
    for path, idx in dup.groupby(dup).groups.items():
        problems.append(f"path {path!r} appears {len(idx)} times ({', '.join(_line(i) for i in idx)})")
    valid = frame[frame["split"].isin(SPLITS)]
    per_patient = valid.groupby(valid["patient_id"].astype(str))["split"].unique()
    for patient, splits in per_patient.items():
        if len(splits) > 1:
            rows = valid.index[valid["patient_id"].astype(str) == patient]
            lines = ", ".join(_line(int(i)) for i in rows[:10]) + (" ..." if len(rows) > 10 else "")
            problems.append(f"patient {patient!r} is in {len(splits)} splits {sorted(splits)} ({lines})")
    for split in require_splits:
        if not (frame["split"] == split).any():
            problems.append(f"split {split!r} is empty")
    if problems:
        raise ManifestError("invalid manifest", problems)


def _as_int(value: object) -> int | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(f) if np.isfinite(f) and f == int(f) else None


def _image_problem(path: Path, decode: bool) -> str | None:
    if not path.is_file():
        return f"image not found: {path}"
    if path.stat().st_size == 0:
        return f"image is empty: {path}"
    if decode:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            return f"image cannot be decoded ({type(exc).__name__}: {exc}): {path}"
    return None


def read_manifest(
    path: str | Path,
    *,
    root: str | Path | None = None,
    classes: Iterable[int] = (0, 1),
    check_images: str = "exists",
    require_splits: Sequence[str] = SPLITS,
) -> Manifest:
    """Read and validate a manifest CSV; relative paths resolve against ``root`` (default: its folder)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        frame = pd.read_csv(path, dtype={"patient_id": str, "path": str, "split": str}, keep_default_na=False,
                            na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc})") from exc
    base = Path(root) if root is not None else path.parent
    validate_manifest(frame, base, classes=classes, check_images=check_images, require_splits=require_splits)
    frame["label"] = frame["label"].astype(np.int64)
    return Manifest(frame, base)


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as a manifest CSV (required columns first, then optional, then others)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"cannot write a manifest without column(s) {missing}")
    ordered = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in frame.columns]
    ordered += [c for c in frame.columns if c not in ordered]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame[ordered].to_csv(path, index=False, lineterminator="\n")
    return path


def assign_patient_splits(
    patient_strata: Mapping[str, object],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, str]:
    """Seeded patient -> split assignment, stratified by the given per-patient stratum.

    Patients are sorted before shuffling, so the result depends only on the set of
    patients, their strata and the seed. Every split gets at least one patient when
    there are at least three.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(fractions)[:2]
    out: dict[str, str] = {}
    for stratum in sorted({str(v) for v in patient_strata.values()}):
        members = sorted(p for p, v in patient_strata.items() if str(v) == stratum)
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        bounds = np.round(cuts * n).astype(int)
        for i, patient in enumerate(members):
            out[patient] = SPLITS[int(np.searchsorted(bounds, i, side="right"))]
    _fill_empty_splits(out, fractions, rng)
    return out


def _fill_empty_splits(assign: dict[str, str], fractions: Sequence[float], rng: np.random.Generator) -> None:
    # Small cohorts can round a split to zero patients; move one from the largest split.
    if len(assign) < 3:
        return
    for split, frac in zip(SPLITS, fractions):
        if frac > 0 and split not in assign.values():
            sizes = {s: sum(v == s for v in assign.values()) for s in SPLITS}
            donor = max(sizes, key=lambda s: sizes[s])
            candidates = sorted(p for p, s in assign.items() if s == donor)
            assign[candidates[int(rng.integers(len(candidates)))]] = split


def _with_splits(frame: pd.DataFrame, stratum: pd.Series, fractions: Sequence[float], seed: int) -> pd.DataFrame:
    splits = assign_patient_splits(stratum.to_dict(), fractions=fractions, seed=seed)
    frame = frame.copy()
    frame.insert(3, "split", frame["patient_id"].map(splits))
    return frame.sort_values(["split", "patient_id", "path"], kind="stable").reset_index(drop=True)


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return path.as_posix()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        import os

        return Path(os.path.relpath(path, base)).as_posix()


def parse_breakhis_name(name: str) -> dict[str, object] | None:
    """Parse ``SOB_B_A-14-22549AB-40-001.png`` -> label, subtype, patient_id, magnification (None if no match)."""
    m = _BREAKHIS_RE.match(name)
    if not m or m["sub"] not in BREAKHIS_SUBTYPES:
        return None
    return {"label": int(m["cls"] == "M"), "subtype": BREAKHIS_SUBTYPES[m["sub"]],
            "patient_id": f"{m['year']}-{m['patient']}", "magnification": int(m["mag"])}


def task_label_array(frame: pd.DataFrame, column: str, class_names: Sequence[str], where: str) -> np.ndarray:
    """Integer labels of a secondary task from manifest column ``column``; -1 where a row has none.

    A cell is a class name from ``class_names`` (e.g. a BreakHis subtype) or a class index;
    an empty cell (or -1) means the row carries no label for this task: it still trains the other
    tasks. Raises :class:`ManifestError` listing every cell that is neither.
    """
    if column not in frame.columns:
        raise ManifestError(f"{where}: the task {column!r} needs a {column!r} column in the manifest "
                            "(empty cells where a sample has no label)")
    index = {str(name): i for i, name in enumerate(class_names)}
    out = np.full(len(frame), -1, dtype=np.int64)
    problems: list[str] = []
    for i, value in enumerate(frame[column].tolist()):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        text = str(value).strip()
        if not text:
            continue
        if text in index:
            out[i] = index[text]
            continue
        number = _as_int(text)
        if number == -1:
            continue
        if number is not None and 0 <= number < len(class_names):
            out[i] = number
        else:
            problems.append(f"{_line(i)}: {column} {value!r} is neither one of {list(class_names)} nor a class "
                            f"index 0..{len(class_names) - 1}")
    if problems:
        raise ManifestError(f"{where}: {column} values outside the task's classes", problems)
    return out

