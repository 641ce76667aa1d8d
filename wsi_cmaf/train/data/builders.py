"""Forgiving dataset builders: IDC and BreakHis trees -> manifest + rejects + duplicate count.

Public datasets are messy: stray files, names that do not parse, and (IDC) a nested copy of
the whole tree in the common download. A builder keeps every valid image, lists each file it
left out with the reason (``ManifestBuild.rejects``, written as a rejects CSV by the CLI) and
counts exact duplicates once. ``strict=True`` refuses the dataset instead (one ManifestError
listing every bad file), which is what ``build_*_manifest`` do by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from wsi_cmaf.errors import ManifestError
from wsi_cmaf.train.data.manifest import (
    _IDC_RE,
    DEFAULT_FRACTIONS,
    _relative,
    _with_splits,
    parse_breakhis_name,
)

logger = logging.getLogger(__name__)

__all__ = ["ManifestBuild", "build_breakhis_manifest", "build_idc_manifest", "scan_breakhis", "scan_idc"]


@dataclass
class ManifestBuild:
    """What a dataset builder found: the manifest ``frame``, the files it left out and why
    (``rejects``: columns ``path, reason``) and how many exact duplicates it counted once."""

    kind: str
    frame: pd.DataFrame
    rejects: pd.DataFrame
    duplicates: int

    def summary(self) -> str:
        """One line: kept rows and patients, rejected files, duplicates."""
        patients = self.frame["patient_id"].nunique() if len(self.frame) else 0
        return (f"{self.kind}: {len(self.frame):,} images from {patients:,} patients kept, "
                f"{len(self.rejects) - self.duplicates:,} rejected, {self.duplicates:,} duplicate(s) counted once")


#: Key of an IDC patch (patient, x, y, class): the same key twice is the same patch.
_IDC_LAYOUT = "PATIENT_idx5_xX_yY_classC.png"
_BREAKHIS_LAYOUT = "SOB_<B|M>_<SUBTYPE>-<YY>-<ID>-<MAG>-<SEQ>.png"


def _depth_first(root: Path, files: Iterable[Path]) -> list[Path]:
    # Shallowest first, then by name: the top-level copy of a nested duplicate tree is the one kept.
    return sorted(files, key=lambda f: (len(f.relative_to(root).parts), f.as_posix()))


def _collect(
    kind: str,
    root: Path,
    files: list[Path],
    parse: Callable[[Path], tuple[dict[str, object] | None, str | None, object]],
    relative_to: str | Path | None,
    strict: bool,
) -> tuple[list[dict[str, object]], list[dict[str, str]], int]:
    """Rows of the valid files, reject rows (path, reason), and the number of duplicates.

    ``parse(file)`` returns (row, None, key) or (None, reason, None). In strict mode any reject
    raises one ManifestError listing them all (duplicates are not rejects: they are counted once).
    """
    base = None if relative_to is None else Path(relative_to)
    rows: list[dict[str, object]] = []
    rejects: list[dict[str, str]] = []
    seen: dict[object, Path] = {}
    duplicates = 0
    for file in files:
        row, reason, key = parse(file)
        if row is None:
            rejects.append({"path": str(file), "reason": str(reason)})
            continue
        if key in seen:
            duplicates += 1
            rejects.append({"path": str(file), "reason": f"duplicate of {seen[key]} (counted once)"})
            continue
        seen[key] = file
        rows.append({"path": _relative(file, base), **row})
    bad = [f"{r['path']}: {r['reason']}" for r in rejects if not r["reason"].startswith("duplicate of ")]
    if strict and bad:
        raise ManifestError(f"unexpected files under {kind} root {root}", bad)
    if bad:
        logger.warning("%s: %d file(s) under %s left out (see the rejects CSV); first: %s",
                       kind, len(bad), root, bad[0])
    if duplicates:
        logger.warning("%s: %d exact duplicate image(s) under %s (e.g. a nested copy of the tree) counted once",
                       kind, duplicates, root)
    return rows, rejects, duplicates


def _rejects_frame(rejects: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rejects, columns=["path", "reason"])


def _scan_tree(kind: str, what: str, root: str | Path, parse: Callable, relative_to: str | Path | None,
               strict: bool) -> tuple[pd.DataFrame, list[dict[str, str]], int]:
    """Every PNG under ``root`` (any depth) parsed into rows, plus the rejects and the duplicate count."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{kind} root is not a directory: {root}")
    files = _depth_first(root, root.rglob("*.png"))
    rows, rejects, duplicates = _collect(kind, root, files, parse, relative_to, strict)
    if not rows:
        raise ManifestError(f"no {kind} {what} found under {root}"
                            + (f" ({len(rejects)} file(s) rejected, first: {rejects[0]['path']}: "
                               f"{rejects[0]['reason']})" if rejects else ""))
    return pd.DataFrame(rows), rejects, duplicates


def _idc_parse(file: Path) -> tuple[dict[str, object] | None, str | None, object]:
    m = _IDC_RE.match(file.name)
    folder_patient, folder_cls = file.parent.parent.name, file.parent.name
    if not m:
        return None, f"name does not match {_IDC_LAYOUT}", None
    if m["patient"] != folder_patient or m["cls"] != folder_cls:
        return None, (f"name says patient {m['patient']} class {m['cls']}, "
                      f"folder says patient {folder_patient} class {folder_cls}"), None
    row = {"label": int(m["cls"]), "patient_id": m["patient"], "x": int(m["x"]), "y": int(m["y"]), "source": "idc"}
    return row, None, (m["patient"], int(m["x"]), int(m["y"]), int(m["cls"]))


def scan_idc(
    root: str | Path,
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    relative_to: str | Path | None = None,
    strict: bool = False,
) -> ManifestBuild:
    """Manifest of an IDC tree ``PATIENT/{0,1}/PATIENT_idx5_xX_yY_classC.png`` plus what was left out.

    PNGs are searched at any depth. A file whose name does not parse, or whose patient or class
    disagrees with its folders, is a reject (``strict``: one ManifestError listing all of them).
    The same patch (patient, x, y, class) found twice, e.g. in the nested copy of the tree that
    the common download contains, is kept once (the shallowest) and counted as a duplicate.
    """
    frame, rejects, duplicates = _scan_tree("IDC", "patches (PATIENT/{0,1}/*.png)", root, _idc_parse,
                                            relative_to, strict)
    # IDC patients hold both classes; stratify on whether a patient has any positive patch.
    stratum = frame.groupby("patient_id")["label"].max()
    return ManifestBuild("idc", _with_splits(frame, stratum, fractions, seed), _rejects_frame(rejects), duplicates)


def build_idc_manifest(
    root: str | Path,
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    relative_to: str | Path | None = None,
    strict: bool = True,
) -> pd.DataFrame:
    """Manifest of an IDC tree (see :func:`scan_idc`); strict by default: any bad file is a ManifestError.

    Paths are written relative to ``relative_to`` (absolute when None).
    """
    return scan_idc(root, seed=seed, fractions=fractions, relative_to=relative_to, strict=strict).frame


def _breakhis_parse(file: Path) -> tuple[dict[str, object] | None, str | None, object]:
    parsed = parse_breakhis_name(file.name)
    if parsed is None:
        return None, f"name does not match {_BREAKHIS_LAYOUT}", None
    # the name encodes class, subtype, patient, magnification and sequence: it is the patch's key
    return {**parsed, "source": "breakhis"}, None, file.name


def scan_breakhis(
    root: str | Path,
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    relative_to: str | Path | None = None,
    strict: bool = False,
) -> ManifestBuild:
    """Manifest of a BreakHis v1 tree (any depth) plus the PNGs left out and the duplicates.

    Patient id is ``YEAR-SLIDE`` (e.g. ``14-22549AB``); splits are patient-level and
    stratified by subtype, so every split sees every subtype where possible. Every PNG is a
    candidate; one whose name does not parse is a reject (``strict``: a ManifestError).
    """
    frame, rejects, duplicates = _scan_tree("BreakHis", "images (SOB_*.png)", root, _breakhis_parse,
                                            relative_to, strict)
    stratum = frame.groupby("patient_id")["subtype"].first()
    return ManifestBuild("breakhis", _with_splits(frame, stratum, fractions, seed), _rejects_frame(rejects),
                         duplicates)


def build_breakhis_manifest(
    root: str | Path,
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    relative_to: str | Path | None = None,
    strict: bool = True,
) -> pd.DataFrame:
    """Manifest of a BreakHis v1 tree (see :func:`scan_breakhis`); strict by default."""
    return scan_breakhis(root, seed=seed, fractions=fractions, relative_to=relative_to, strict=strict).frame
