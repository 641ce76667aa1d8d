"""The state one ``analyze_slide`` call hands from stage to stage (in place of a dozen loose parameters)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.modelspec import ResolvedModel
from wsi_cmaf.output.store import HeatmapStore
from wsi_cmaf.slide.grid import TileGrid
from wsi_cmaf.slide.tissue import TissueMask


class StageTimer(dict):
    """Seconds per stage name; ``with timer("tissue"): ...`` adds the block's wall time."""

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class SlideRun:
    """One slide's analysis: what was opened and resolved, where it is written, and what it reports.

    ``reader`` holds the slide's metadata, ``pixels`` decodes its pixels (often the same reader);
    ``warnings`` collects the messages of every stage for the summary.
    """

    path: Path
    reader: Any
    pixels: Any
    resolved: ResolvedModel
    cfg: InferenceConfig
    device: torch.device
    grid: TileGrid
    mask: TissueMask
    store: HeatmapStore
    timer: StageTimer = field(default_factory=StageTimer)
    warnings: list[str] = field(default_factory=list)
