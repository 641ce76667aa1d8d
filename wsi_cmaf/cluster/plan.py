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

from wsi_cmaf.cluster.inputs import SlideJob, collect_slides
from wsi_cmaf.cluster.status import StatusTable
from wsi_cmaf.errors import WsiCmafError
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

    @property
    def skipped(self) -> int:
        """Slides already done with the same file and model."""
        return len(self.jobs) - len(self.todo)

    def result(self, t0: float, dashboard: str | None = None) -> BatchResult:
        """The batch result as the status table now records it (``t0``: ``perf_counter`` at the start)."""
        rows = [self.table.get(j.key) for j in self.jobs]
        return BatchResult(self.table.path, rows, self.table.counts(), self.skipped,
                           time.perf_counter() - t0, dashboard)


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


def plan_batch(slides: str | Path | list[str | Path], out_dir: str | Path, weights_sha256: str) -> BatchPlan:
    """Collect the slides, open ``out_dir/status.csv`` and list those not done with these weights."""
    jobs = collect_slides(slides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = StatusTable(out / "status.csv")
    todo = [j for j in jobs if not already_done(table.get(j.key), j, weights_sha256)]
    if len(jobs) > len(todo):
        logger.info("%d of %d slides already done; skipping them", len(jobs) - len(todo), len(jobs))
    return BatchPlan(jobs, table, weights_sha256, todo)
