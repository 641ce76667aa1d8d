"""Writing outputs where the disk can fail: write errors as named errors, files that appear
whole or not at all, and a free-space check made before any inference.

The heatmap store itself is written by zarr, whose local store already writes each chunk to a
temporary name and renames it; the exports (overlay PNG, GeoJSON, summary JSON) go through
:func:`atomic_write_bytes` for the same reason: a reader never finds half a file under the
final name.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeGuard

from wsi_cmaf.errors import InsufficientSpaceError, OutputWriteError

logger = logging.getLogger(__name__)

#: errors of the output location rather than of the program: a full disk, a read-only mount,
#: missing permission, an exhausted quota
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EDQUOT: "disk quota exceeded"}

_ADVICE = {errno.ENOSPC: "free some space or write elsewhere (--out)",
           errno.EDQUOT: "free some of your quota or write elsewhere (--out)",
           errno.EROFS: "write to a writable folder (--out)",
           errno.EACCES: "write to a folder you may write to (--out) or fix its permissions",
           errno.EPERM: "write to a folder you may write to (--out) or fix its permissions"}


def is_write_error(exc: BaseException) -> TypeGuard[OSError]:
    """Whether ``exc`` is an OS error of the output location (see :data:`WRITE_ERRNOS`)."""
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def write_error(exc: OSError, path: str | Path, kept: str = "") -> OutputWriteError:
    """An :class:`OutputWriteError` for ``exc`` raised while writing ``path``; ``kept`` says what
    of the output is still good (e.g. which blocks a rerun resumes from)."""
    target = Path(exc.filename) if getattr(exc, "filename", None) else Path(path)
    number = exc.errno
    meaning = (WRITE_ERRNOS.get(number) if number is not None else None) or exc.strerror or str(exc)
    code = errno.errorcode.get(number, str(number)) if number is not None else "?"
    advice = (_ADVICE.get(number) if number is not None else None) or "check the output folder"
    return OutputWriteError(target, exc.errno,
                            f"cannot write {target}: {meaning} ({code}); {advice}" + (f"; {kept}" if kept else ""))


@contextmanager
def translated_write_errors(path: str | Path, kept: str = "") -> Iterator[None]:
    """Turn a write error of the output location raised inside into :class:`OutputWriteError`."""
    try:
        yield
    except OSError as exc:
        if not is_write_error(exc):
            raise
        raise write_error(exc, path, kept) from exc


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it, so
    ``path`` is either the old file or the whole new one; :class:`OutputWriteError` on a write error."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; an output is meant to be read by others
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if is_write_error(exc):
            raise write_error(exc, path) from exc
        raise
    finally:
        if tmp is not None:
            with _ignored_os_errors():
                os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def _ignored_os_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # cleaning up after a failed write: the original error matters
        logger.debug("could not remove a temporary file: %s", exc)


def estimate_store_bytes(grid_shape: tuple[int, int], block_shape: tuple[int, int], n_blocks: int,
                         n_classes: int, *, levels: int = 3, embedding_dim: int | None = None,
                         n_tasks: int = 0, block_size: int = 4096) -> int:
    """A lower bound of the bytes a heatmap store of this grid takes on disk.

    Every chunk is one file and a file takes at least one file-system block, so the bound counts
    the files a run surely writes (per computed block: the probability, tissue, done-flag and
    manifest chunks, each task's and the embeddings' chunk; the pyramid levels; the zarr.json
    documents) at one block each, or at the uncompressed chunk size divided by 8 (zstd rarely
    does better on probabilities) where that is larger. Compression makes real stores larger
    than this, never smaller, so a file system with less free space cannot hold the store.
    """
    rows, cols = (int(v) for v in grid_shape)
    k0, k1 = (int(v) for v in block_shape)
    tile_cells = min(k0, rows) * min(k1, cols)

    def chunk(nbytes: int) -> int:
        return max(block_size, -(-nbytes // 8 // block_size) * block_size)

    per_block = chunk(n_classes * tile_cells * 4) + 3 * block_size  # probs; tissue, done, manifest
    per_block += n_tasks * chunk(2 * tile_cells * 4)
    if embedding_dim:
        per_block += chunk(int(embedding_dim) * tile_cells * 2)
    pyramid = sum(max(1, n_blocks >> (2 * lvl)) for lvl in range(1, levels)) * 2 * block_size
    documents = (14 + 4 * n_tasks) * block_size
    return int(n_blocks * per_block + pyramid + documents)


def free_bytes(path: str | Path) -> tuple[int, int]:
    """(bytes free to this user, file-system block size) where ``path`` (or its nearest existing
    parent) lives."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return int(st.f_bavail * st.f_frsize), int(st.f_frsize or 4096)


def check_free_space(path: str | Path, need: int) -> None:
    """:class:`InsufficientSpaceError` when the file system of ``path`` has less than ``need``
    bytes free; nothing happens where free space cannot be asked (no ``statvfs``)."""
    try:
        free, _ = free_bytes(path)
    except (OSError, AttributeError):
        return
    if free < need:
        raise InsufficientSpaceError(
            path, need, free, f"{path}: the heatmap store needs at least {_human(need)} but only {_human(free)} "
            "is free there; free some space or write elsewhere (--out)")
    logger.debug("%s: %s free, the store needs at least %s", path, _human(free), _human(need))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


__all__ = ["WRITE_ERRNOS", "is_write_error", "write_error", "translated_write_errors", "atomic_write_bytes",
           "atomic_write_text", "estimate_store_bytes", "free_bytes", "check_free_space"]
