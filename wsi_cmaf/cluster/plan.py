"""What a batch run has left to do, decided from its status table alone (no torch, no dask).

A rerun over a finished archive should cost about the time of reading ``status.csv`` and
fingerprinting the slides: :func:`plan_batch` imports neither the model code nor
dask.distributed, so ``wsi-cmaf batch`` can answer such a rerun before loading either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_cmaf import errors
from wsi_cmaf.cluster.inputs import SlideJob, collect_slides
from wsi_cmaf.cluster.status import QC_COLUMNS, StatusTable
from wsi_cmaf.errors import SlideNotFoundError, WsiCmafError
from wsi_cmaf.slide.reader import file_fingerprint

logger = logging.getLogger(__name__)

__all__ = ["BatchResult", "BatchPlan", "plan_batch", "already_done"]


@dataclass
class BatchResult:
    """What a batch run did: the status table and per-status counts."""

    status_path: Path
    rows: list[dict[str, Any]]
    counts: dict[str, int]
    skipped: int
    seconds: float
    dashboard: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchPlan:
    """The slides of a batch, its status table, the weights it was planned for, and the slides
    still to analyse."""

    jobs: list[SlideJob]
    table: StatusTable
    weights_sha256: str
    todo: list[SlideJob]

    permanent_failures: int = 0

    @property
    def skipped(self) -> int:
        """Inputs not analysed by this run: done before, or failed before for good."""
        return len(self.jobs) - len(self.todo)

    def sync_aliases(self) -> None:
        """Give every input that names another input's file that input's outcome, with a note."""
        by_key = {j.key: j for j in self.jobs}
        for j in self.jobs:
            if j.same_as is None:
                continue
            primary = self.table.get(j.same_as) or {}
            note = f"same file as {by_key[j.same_as].path}; analysed once, as {j.same_as}"
            fields = {c: primary.get(c, "") for c in ("fingerprint", "status", "error", "error_type",
                                                       "tissue_tiles", "output", "model_hash", *QC_COLUMNS)}
            fields["seconds"] = 0
            row = self.table.get(j.key) or {}
            if any(str(row.get(c, "")) != str(v) for c, v in fields.items()) or row.get("note") != note:
                self.table.update(j.key, slide=str(j.path), note=note, **fields)

    def result(self, t0: float, dashboard: str | None = None) -> BatchResult:
        """The batch result as the status table now records it (``t0``: ``perf_counter`` at the start)."""
        # a job the run never reached (interrupted before its first write) has no row to report
        rows = [row for j in self.jobs if (row := self.table.get(j.key)) is not None]
        return BatchResult(self.table.path, rows, self.table.counts(), self.skipped,
                           time.perf_counter() - t0, dashboard)


def current_fingerprint(path: Path) -> str:
    """The file's fingerprint, ``"missing"`` when it does not exist, ``""`` when it cannot be read."""
    try:
        return file_fingerprint(path)
    except SlideNotFoundError:
        return "missing"
    except (WsiCmafError, OSError):
        return ""


def already_done(row: dict[str, Any] | None, job: SlideJob, model_hash: str) -> bool:
    """Whether the status row says ``job`` finished with this model and the file is unchanged."""
    if not row or row.get("status") != "done" or row.get("model_hash") != model_hash:
        return False
    if not row.get("output") or not Path(row["output"]).exists():
        return False
    try:
        return row.get("fingerprint") == file_fingerprint(job.path)
    except WsiCmafError:
        return False


def is_permanent_error(error_type: str | None) -> bool:
    """Whether a recorded error class is a property of the input file (retrying cannot help).

    Input errors (:class:`~wsi_cmaf.errors.SlideError`: missing, not a slide, unreadable,
    unsupported, no µm/px) are; errors of the run (output, disk, model, lost workers) are not.
    """
    cls = getattr(errors, str(error_type or ""), None)
    return isinstance(cls, type) and issubclass(cls, errors.SlideError)


def failed_for_good(row: dict[str, Any] | None, job: SlideJob, model_hash: str) -> bool:
    """Whether ``job`` failed with a permanent input error on this same file and model."""
    if not row or row.get("status") != "failed" or row.get("model_hash") != model_hash:
        return False
    if not is_permanent_error(row.get("error_type")):
        return False
    recorded = row.get("fingerprint") or ""
    return bool(recorded) and recorded == current_fingerprint(job.path)


def plan_batch(slides: str | Path | list[str | Path], out_dir: str | Path, weights_sha256: str,
               *, retry_failed: bool = False, status_name: str = "status.csv") -> BatchPlan:
    """Collect the slides, open ``out_dir/status.csv`` and list those still to analyse.

    Left out: slides done with these weights, inputs naming the same file as another input
    (analysed once, see :class:`SlideJob`), and, unless ``retry_failed``, slides that failed with
    a permanent input error on an unchanged file (their row is reported as it stands).
    """
    jobs = collect_slides(slides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = StatusTable(out / status_name)  # status_name: one table per kind of run sharing out_dir
    todo, kept_failed = [], 0
    for j in jobs:
        row = table.get(j.key)
        if j.same_as is not None or already_done(row, j, weights_sha256):
            continue
        if not retry_failed and failed_for_good(row, j, weights_sha256):
            kept_failed += 1
            continue
        todo.append(j)
    plan = BatchPlan(jobs, table, weights_sha256, todo)
    plan.permanent_failures = kept_failed
    plan.sync_aliases()
    done = len(jobs) - len(todo) - kept_failed
    if done:
        logger.info("%d of %d inputs already done; skipping them", done, len(jobs))
    if kept_failed:
        logger.info("%d inputs failed before with an input error on the same file; not retried "
                    "(--retry-failed retries them)", kept_failed)
    return plan
