"""Cost of the slide QC inside ``analyze_slide`` on CPU: each real slide analysed with the QC off and
on (default model, default settings, fresh output each time); prints a Markdown table.

    .venv/bin/python benchmarks/bench_qc_cost.py [SLIDE_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from wsi_cmaf.infer import InferenceConfig, analyze_slide

SLIDES = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/data/slides"
#: the files without µm/px get the value the QC estimates for them
CASES = [("cmu_small_region.svs", None), ("cmu_small_region_pyramid_3level.tiff", None),
         ("tcga-cr-7395-01a-01-ts1.svs", 0.87), ("small_dicom.dcm", 1.3)]


def run(path: Path, mpp: float | None, qc: bool, out: Path) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    res = analyze_slide(path, out=out, mpp=mpp, config=InferenceConfig(progress=False, qc=qc))
    return time.perf_counter() - t0, res.timings.get("qc", 0.0), res.tiles_tissue


def main() -> None:
    print("| slide | tissue tiles | analysis, QC off (s) | analysis, QC on (s) | QC stage (s) | QC / analysis |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        run(SLIDES / CASES[0][0], None, False, Path(tmp) / "warm")  # model load and imports out of the timing
        for i, (name, mpp) in enumerate(CASES):
            off, _, n = run(SLIDES / name, mpp, False, Path(tmp) / f"off{i}")
            on, qc, _ = run(SLIDES / name, mpp, True, Path(tmp) / f"on{i}")
            print(f"| {name} | {n} | {off:.2f} | {on:.2f} | {qc:.2f} | {qc / off:.1%} |")


if __name__ == "__main__":
    main()
