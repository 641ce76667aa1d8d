"""Turn the batch ``INPUT`` (paths, a glob, a directory or a CSV) into a list of slide jobs."""

from __future__ import annotations

import csv
import filecmp
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
    """One input of a batch: where it is, its optional µm/px override, its output key, and,
    when it names the same file as an earlier input (a link, a hard link or an exact copy),
    that input's key: such an input is analysed once, under the earlier key."""

    path: Path
    mpp: float | str | None  # µm/px, "estimate" or None (the file's metadata)
    key: str  # unique output folder name inside the batch output directory
    same_as: str | None = None


def _from_csv(csv_path: Path) -> list[tuple[Path, float | str | None]]:
    rows: list[tuple[Path, float | str | None]] = []
    problems: list[str] = []
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ConfigError(f"{csv_path}: a batch CSV needs a 'path' column (optional 'mpp': µm/px or 'estimate')")
        for i, row in enumerate(reader, start=2):
            p = Path(row["path"]).expanduser()
            if not p.is_absolute():
                p = csv_path.parent / p
            mpp_text = (row.get("mpp") or "").strip()
            if mpp_text.lower() == "estimate":  # measured from the nuclei (wsi_cmaf.qc.mpp_estimate)
                rows.append((p, "estimate"))
                continue
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError:
                problems.append(f"line {i}: mpp {mpp_text!r} is neither a number of µm/px nor 'estimate'")
                continue
            if mpp is not None and mpp <= 0:
                problems.append(f"line {i}: mpp must be > 0, got {mpp}")
                continue
            rows.append((p, mpp))
    if problems:
        raise ConfigError(f"{csv_path}: bad rows: " + "; ".join(problems))
    return rows


def _expand(item: str | Path) -> list[tuple[Path, float | str | None]]:
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
    """Output names unique per input path.

    The stem alone when no other input shares it; else the stem plus a short hash of the folder
    (``s-f164b278``); and when two inputs of one folder share a stem (``s.svs``, ``s.tiff``),
    the extension too (``s-f164b278-svs``), so no two inputs ever write one store.
    """
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
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    keys = [f"{k}-{p.suffix.lstrip('.').lower() or 'noext'}" if counts[k] > 1 else k for k, p in zip(keys, paths)]
    seen: dict[str, Path] = {}
    for k, p in zip(keys, paths):
        if k in seen:  # e.g. s.TIFF and s.tiff in one folder on a case-sensitive file system
            raise ConfigError(f"inputs {seen[k]} and {p} would share the output folder {k!r}; rename one")
        seen[k] = p
    return keys


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _same_files(paths: list[Path]) -> list[int | None]:
    """For each path, the index of an earlier path holding the same file, else None.

    The same file: one real path (symbolic links), one inode (hard links), or byte-identical
    content (a copy). Content is compared only between regular files of equal size whose
    fingerprints (size + first and last MiB) agree, and then in full.
    """
    from wsi_cmaf.slide.reader import file_fingerprint

    first_of: dict[object, int] = {}
    by_size: dict[int, list[int]] = {}
    out: list[int | None] = []
    for i, p in enumerate(paths):
        ident = _identity(p)
        real = os.path.realpath(p)
        hit = first_of.get(("real", real))
        if hit is None and ident is not None:
            hit = first_of.get(("inode", ident))
        if hit is None and p.is_file():
            size = p.stat().st_size
            for j in by_size.get(size, []):
                if file_fingerprint(paths[j]) == file_fingerprint(p) and filecmp.cmp(paths[j], p, shallow=False):
                    hit = j
                    break
            if hit is None:
                by_size.setdefault(size, []).append(i)
        out.append(hit)
        if hit is None:
            first_of[("real", real)] = i
            if ident is not None:
                first_of[("inode", ident)] = i
    return out


def collect_slides(slides: str | Path | list[str | Path]) -> list[SlideJob]:
    """Every input named by a list, a glob, a directory (recursive) or a CSV (``path[,mpp]``).

    One job per distinct input path, each with its own key. Inputs holding the same file as an
    earlier one (links, hard links, exact copies) keep their own job and key, marked ``same_as``
    that earlier input: they are analysed once and reported under each name, never dropped.
    """
    items = slides if isinstance(slides, list | tuple) else [slides]
    found: list[tuple[Path, float | str | None]] = []
    for item in items:
        found.extend(_expand(item))
    seen: set[str] = set()
    unique = []
    for p, mpp in found:
        name = os.path.abspath(p)  # the same path named twice is one input
        if name not in seen:
            seen.add(name)
            unique.append((p, mpp))
    if not unique:
        raise ConfigError(f"no slides found in {slides!s} (known extensions: {sorted(WSI_EXTENSIONS)})")
    paths = [p for p, _ in unique]
    keys = _keys(paths)
    same = _same_files(paths)
    jobs = []
    for (p, mpp), k, j in zip(unique, keys, same):
        # a different µm/px override is a different analysis: then the copy is analysed on its own
        primary = j if j is not None and unique[j][1] == mpp else None
        jobs.append(SlideJob(p, mpp, k, keys[primary] if primary is not None else None))
    return jobs
