"""The summary ``analyze_slide`` returns."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas


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
    #: model + weights hash, slide fingerprint, versions, invocation, UTC time (see output.provenance)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: undecodable tiles with level-0 x, y, width, height and reason: the tissue stage's slide tiles
    #: (``stage`` "tissue") and the grid tiles left without a probability (``stage`` "inference")
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    #: slide tiles the tissue stage could not decode (painted as background; ``tiles_failed``
    #: counts the grid tiles without a probability)
    tissue_stage_failed_tiles: int = 0
    #: a multi-task model's tasks, primary first: {task: {"classes", "store_group", "mean_probability"
    #: per class over the tissue tiles with a value}}; empty for a single-task model
    tasks: dict[str, Any] = field(default_factory=dict)
    #: the slide QC (µm/px check, ink, out-of-focus tiles; keys in wsi_cmaf.qc.report); {} when off
    qc: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> Path:
        """Path of the Zarr store."""
        return self.outputs["store"]

    def tiles(self, *, tissue_only: bool = True) -> pandas.DataFrame:
        """The tile table of this result's store as a pandas DataFrame (one row per tile).

        Columns: ``row, col`` (grid index), ``x, y, w, h`` (level-0 pixels of the tile's
        top-left corner and size), ``x_um, y_um`` (tile centre in µm), ``tissue_fraction`` and
        one ``prob_<class>`` column per class (NaN where no value was computed); a multi-task
        model adds ``prob_<task>_<class>`` for every class of its other tasks. See
        :func:`wsi_cmaf.output.tiles.tile_table`.
        """
        from wsi_cmaf.output.tiles import tile_table

        return tile_table(self.store, tissue_only=tissue_only)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (paths as absolute strings)."""
        d = asdict(self)
        d["slide"] = str(Path(self.slide).absolute())
        d["outputs"] = {k: str(Path(v).absolute()) for k, v in self.outputs.items()}
        return d

    def to_json(self, path: str | Path) -> Path:
        """Write the summary as JSON (to a temporary name, then renamed: never half a file)."""
        from wsi_cmaf.output.store_io import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    def summary_lines(self) -> list[str]:
        """Human-readable summary for the CLI."""
        lines = [
            f"slide           {self.slide}",
            f"reader          {self.backend}  ({self.mpp[0]:.4f} µm/px from {self.mpp_source})",
            f"model           {self.model_name}  [{self.weights_note}]",
            f"device          {self.device}",
            f"tiles           {self.tiles_tissue} tissue of {self.tiles_total} "
            f"({self.tiles_failed} failed"
            + (f", {self.tissue_stage_failed_tiles} undecodable in the tissue stage)" if self.tissue_stage_failed_tiles
               else ")"),
            f"blocks          {self.blocks_computed} computed, {self.blocks_skipped} resumed, "
            f"{self.blocks_failed} failed",
            f"tissue area     {self.tissue_area_mm2:.2f} mm²",
            f"above threshold {100 * self.positive_fraction:.1f} % of tissue tiles",
            f"probability     max {self.max_probability:.3f}, mean {self.mean_probability:.3f}",
            "timings         " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()),
        ]
        lines += [f"task {t:<10} {', '.join(f'{c} {p:.3f}' for c, p in info['mean_probability'].items())}"
                  f"  (mean probabilities, {info['store_group']})" for t, info in self.tasks.items()]
        if self.qc:
            q = self.qc
            est = q.get("mpp_estimate")
            lines.append("slide QC        µm/px from nuclei "
                         + ("not checked" if est is None else f"{est:.3g} ({q['mpp_estimate_interval'][0]:.3g}-"
                            f"{q['mpp_estimate_interval'][1]:.3g})")
                         + f"; ink {100 * q.get('ink_fraction', 0.0):.1f} % ({q.get('ink_tiles', 0)} tiles left out); "
                         f"{q.get('blurred_tiles', 0)} of {q.get('tissue_tiles', 0)} tiles out of focus"
                         + (" (left out)" if q.get("blur_excluded") else ""))
        lines += [f"{k:<15} {v}" for k, v in self.outputs.items()]
        lines += [f"warning         {w}" for w in self.warnings]
        return lines
