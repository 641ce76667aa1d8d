"""Turn the batch ``INPUT`` (paths, a glob, a directory or a CSV) into a list of slide jobs."""

from __future__ import annotations

import csv
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from wsi_cmaf.errors import ConfigError

#: extensions of the whole-slide formats our backends read (OpenSlide, tiffslide, wsidicom).
WSI_EXTENSIONS = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm",
})


@dataclass(frozen=True)
class SlideJob:
    """One slide of a batch: where it is, its optional µm/px override, and its output key."""

    path: Path
    mpp: float | None
    key: str  # unique output folder name inside the batch output directory


def _from_csv(csv_path: Path) -> list[tuple[Path, float | None]]:
    rows: list[tuple[Path, float | None]] = []
    problems: list[str] = []
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ConfigError(f"{csv_path}: a batch CSV needs a 'path' column (optional 'mpp')")
        for i, row in enumerate(reader, start=2):
            p = Path(row["path"]).expanduser()
            if not p.is_absolute():
                p = csv_path.parent / p
            mpp_text = (row.get("mpp") or "").strip()
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError:
                problems.append(f"line {i}: mpp {mpp_text!r} is not a number")
                continue
            if mpp is not None and mpp <= 0:
                problems.append(f"line {i}: mpp must be > 0, got {mpp}")
                continue
            rows.append((p, mpp))
    if problems:
        raise ConfigError(f"{csv_path}: bad rows: " + "; ".join(problems))
    return rows


def _expand(item: str | Path) -> list[tuple[Path, float | None]]:
    p = Path(item).expanduser()
    if p.is_dir():
        return [(f, None) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in WSI_EXTENSIONS]
    if p.suffix.lower() == ".csv" and p.is_file():
        return _from_csv(p)
    if any(ch in str(item) for ch in "*?["):
        return [(Path(f), None) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
    # A single path, existing or not: a missing slide is reported per slide, not for the batch.
    return [(p, None)]


def _keys(paths: list[Path]) -> list[str]:
    """Output names unique per slide: the stem, plus a short hash of the folder when stems collide."""
    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    keys = []
    for p in paths:
        if stems[p.stem] == 1:
            keys.append(p.stem)
        else:
            digest = hashlib.sha1(str(p.resolve().parent).encode()).hexdigest()[:8]
            keys.append(f"{p.stem}-{digest}")
    return keys


def collect_slides(slides: str | Path | list[str | Path]) -> list[SlideJob]:
    """Slides named by a list, a glob, a directory (recursive) or a CSV (``path[,mpp]``)."""
    items = slides if isinstance(slides, list | tuple) else [slides]
    found: list[tuple[Path, float | None]] = []
    for item in items:
        found.extend(_expand(item))
    seen: set[str] = set()
    unique = []
    for p, mpp in found:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            unique.append((p, mpp))
    if not unique:
        raise ConfigError(f"no slides found in {slides!s} (known extensions: {sorted(WSI_EXTENSIONS)})")
    keys = _keys([p for p, _ in unique])
    return [SlideJob(p, mpp, k) for (p, mpp), k in zip(unique, keys)]
