"""The summary ``analyze_slide`` returns."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SlideResult:
    """What one slide analysis produced and how long each stage took."""

    slide: Path
    outputs: dict[str, Path]
    tiles_total: int
    tiles_tissue: int
    tiles_failed: int
    blocks_total: int
    blocks_computed: int
    blocks_skipped: int
    blocks_failed: int
    tissue_area_mm2: float
    positive_fraction: float
    max_probability: float
    mean_probability: float
    timings: dict[str, float]
    device: str
    backend: str
    mpp: tuple[float, float]
    mpp_source: str
    model_name: str
    weights_note: str
    warnings: list[str] = field(default_factory=list)

    @property
    def store(self) -> Path:
        """Path of the Zarr store."""
        return self.outputs["store"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (paths as strings)."""
        d = asdict(self)
        d["slide"] = str(self.slide)
        d["outputs"] = {k: str(v) for k, v in self.outputs.items()}
        return d

    def to_json(self, path: str | Path) -> Path:
        """Write the summary as JSON."""
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2))
        return p

    def summary_lines(self) -> list[str]:
        """Human-readable summary for the CLI."""
        lines = [
            f"slide           {self.slide}",
            f"reader          {self.backend}  ({self.mpp[0]:.4f} µm/px from {self.mpp_source})",
            f"model           {self.model_name}  [{self.weights_note}]",
            f"device          {self.device}",
            f"tiles           {self.tiles_tissue} tissue of {self.tiles_total} "
            f"({self.tiles_failed} failed)",
            f"blocks          {self.blocks_computed} computed, {self.blocks_skipped} resumed, "
            f"{self.blocks_failed} failed",
            f"tissue area     {self.tissue_area_mm2:.2f} mm²",
            f"above threshold {100 * self.positive_fraction:.1f} % of tissue tiles",
            f"probability     max {self.max_probability:.3f}, mean {self.mean_probability:.3f}",
            "timings         " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()),
        ]
        lines += [f"{k:<15} {v}" for k, v in self.outputs.items()]
        lines += [f"warning         {w}" for w in self.warnings]
        return lines
