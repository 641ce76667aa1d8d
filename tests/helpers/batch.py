"""A batch's status table read as plain CSV rows, independently of wsi_cmaf's own reader."""

from __future__ import annotations

import csv
from pathlib import Path


def status_rows(path: Path) -> list[dict[str, str]]:
    """The rows of the status table at ``path`` (``out/status.csv``), in file order."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
