"""What ``analyze_slide`` checks around its outputs: one writer per store, enough free space
before inference, write errors as named errors, and model outputs that are numbers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wsi_cmaf.errors import NonFiniteOutputError, WsiCmafError
from wsi_cmaf.infer.stream import RESUMABLE
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.store_io import check_free_space, estimate_store_bytes, free_bytes, is_write_error, write_error
from wsi_cmaf.output.store_layout import read_store_meta
from wsi_cmaf.output.store_lock import StoreLock, acquire_store_lock

logger = logging.getLogger("wsi_cmaf.infer.pipeline")

#: above this share of tissue tiles with NaN/Inf model output the slide fails as a whole
MAX_NONFINITE_FRACTION = 0.01


def _related(a: Path, b: Path) -> bool:
    """Whether one of the two paths lies inside (or is) the other."""
    a, b = a.absolute(), b.absolute()
    return a == b or a in b.parents or b in a.parents


@contextmanager
def output_write_errors(out_dir: Path, store_path: Path) -> Iterator[None]:
    """Turn a write error (full disk, read-only, no permission, quota) on ``out_dir``, one of its
    parents or anything inside it into :class:`~wsi_cmaf.errors.OutputWriteError` saying what is
    kept (``store_path``'s done blocks, if it exists yet); OS errors of other files (the slide)
    pass unchanged."""
    try:
        yield
    except OSError as exc:
        name = getattr(exc, "filename", None)
        if is_write_error(exc) and (name is None or _related(Path(name), out_dir)):
            kept = RESUMABLE if read_store_meta(store_path) is not None else "nothing was written yet"
            raise write_error(exc, out_dir, kept) from exc
        raise


def writer_lock(out_dir: Path, store_path: Path, wait: bool) -> StoreLock:
    """Create ``out_dir`` and take the writer lock of ``store_path`` (``<store>.lock`` beside it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return acquire_store_lock(store_path, wait=wait)


def check_output_space(store_path: Path, grid: Any, n_classes: int, *, overwrite: bool,
                       embedding_dim: int | None = None, n_tasks: int = 0) -> None:
    """Refuse (:class:`~wsi_cmaf.errors.InsufficientSpaceError`) when the store's file system has
    clearly less free space than the blocks still to compute need.

    Counts every block of a new store, the blocks not done of one being resumed; skipped when an
    existing store is to be overwritten (the space it frees is not known without walking it).
    """
    n_blocks, fresh = len(grid.blocks), True
    if read_store_meta(store_path) is not None:
        if overwrite:
            return
        try:
            done = HeatmapStore.open(store_path, "r").done
            n_blocks = sum(1 for b in grid.blocks if not done[b.index])
            fresh = False
        except (WsiCmafError, IndexError, KeyError, ValueError) as exc:  # opening names it later
            logger.debug("%s: not counting done blocks (%s)", store_path, exc)
    try:
        _, block_size = free_bytes(store_path)
    except OSError:
        return
    need = estimate_store_bytes(grid.shape, grid.block_shape, n_blocks, n_classes, embedding_dim=embedding_dim,
                                n_tasks=n_tasks, block_size=max(block_size, 512))
    if not fresh:
        need -= (14 + 4 * n_tasks) * max(block_size, 512)  # its documents exist already
    check_free_space(store_path, max(0, need))


def check_nonfinite(store: HeatmapStore, grid: Any, model_name: str, precision: str, warn: list[str]) -> None:
    """:class:`~wsi_cmaf.errors.NonFiniteOutputError` when more than
    :data:`MAX_NONFINITE_FRACTION` of the tissue tiles got NaN/Inf from the model; a warning for fewer."""
    n = store.nonfinite_tiles()
    if not n:
        return
    total = max(1, int(grid.n_tissue))
    share = n / total
    if share > MAX_NONFINITE_FRACTION:
        hint = ("rerun with --precision off (fp16/bf16 overflow is the usual cause)" if precision != "off"
                else "the model fails in full precision too: check its checkpoint or export")
        raise NonFiniteOutputError(
            f"model {model_name!r} returned NaN/Inf for {n} of {total} tissue tiles ({100 * share:.1f} %, more "
            f"than {100 * MAX_NONFINITE_FRACTION:.0f} %): its heatmap cannot be trusted; {hint}. The tiles are "
            f"marked failed in {store.path}, so the rerun computes only their blocks again")
    warn.append(f"{n} tissue tile(s) got NaN/Inf from the model: NaN in the heatmap, listed in failed_tiles")
    logger.warning("%s: %d tissue tile(s) with non-finite model output", store.path, n)
