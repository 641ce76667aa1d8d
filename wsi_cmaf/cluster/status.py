"""The batch status table: one CSV row per slide, rewritten atomically as slides finish."""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path
from typing import Any

COLUMNS = ["slide", "key", "fingerprint", "status", "error", "error_type", "tissue_tiles", "seconds",
           "output", "model_hash", "attempts", "note", "updated"]
#: slide QC columns (filled by wsi_cmaf.qc.report.status_fields): sort an archive by suspicious µm/px or ink
QC_COLUMNS = ["mpp", "mpp_source", "mpp_estimate", "mpp_ratio", "ink_fraction", "blurred_tiles"]
COLUMNS += QC_COLUMNS


class StatusTable:
    """CSV status table keyed by slide key; every update replaces the file atomically.

    Atomic replacement (write a temporary file, then ``os.replace``) means a crash or a
    concurrent reader never sees half a table.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                for row in csv.DictReader(fh):
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        """The row of ``key`` or None."""
        return self.rows.get(key)

    def update(self, key: str, **fields: Any) -> None:
        """Merge ``fields`` into the row of ``key`` and write the table."""
        row = self.rows.setdefault(key, {c: "" for c in COLUMNS})
        row.update({k: ("" if v is None else v) for k, v in fields.items()})
        row["key"] = key
        row["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.write()

    def write(self) -> None:
        """Write the whole table atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".status-", suffix=".csv")
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
                writer.writeheader()
                for row in self.rows.values():
                    writer.writerow(row)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def counts(self) -> dict[str, int]:
        """Number of slides per status."""
        out: dict[str, int] = {}
        for row in self.rows.values():
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out
