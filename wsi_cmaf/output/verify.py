"""``wsi-cmaf verify``: check a heatmap store's done blocks against what was written.

The per-block manifest and the checks themselves are in :mod:`wsi_cmaf.output.store_verify`;
:func:`verify_store` opens a store read-only, runs them and says whether a run is writing it now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.output.store_lock import read_lock_record
from wsi_cmaf.output.store_verify import BlockProblem


@dataclass
class VerifyReport:
    """The outcome of checking a store's done blocks against their manifest rows."""

    path: Path
    deep: bool
    blocks_total: int
    blocks_done: int
    blocks_failed: int
    finalized: bool
    problems: list[BlockProblem] = field(default_factory=list)
    #: the lock record of a run writing the store right now ({} when none): its blocks may change
    writer: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every done block matches its manifest."""
        return not self.problems

    def lines(self) -> list[str]:
        """Human-readable report: a headline, then one line per damaged block."""
        how = "data reread" if self.deep else "chunk keys and sizes"
        head = (f"{self.path}: {self.blocks_done}/{self.blocks_total} blocks done, {self.blocks_failed} failed, "
                f"{'finalized' if self.finalized else 'not finalized'}; checked {how}: ")
        busy = ([f"  note: pid {self.writer.get('pid')} on {self.writer.get('host')} is writing this store now; "
                 "a block it is rewriting can look damaged until it is done"] if self.writer else [])
        if self.ok:
            return [head + "whole", *busy]
        return [head + f"{len(self.problems)} damaged block(s) (rerun the same analysis to recompute them)",
                *(f"  {p}" for p in self.problems), *busy]


def verify_store(path: str | Path, deep: bool = False) -> VerifyReport:
    """Check the done blocks of the store at ``path`` against their manifest rows (read-only).

    The default lists chunk files and compares sizes; ``deep`` rereads every done block.
    """
    store = HeatmapStore.open(path, "r")
    return VerifyReport(path=store.path, deep=deep, blocks_total=int(store.done.size),
                        blocks_done=int(store.done.sum()), blocks_failed=int((store.failed & ~store.done).sum()),
                        finalized=store.finalized, problems=store.check_blocks(deep=deep),
                        writer=read_lock_record(store.path))
