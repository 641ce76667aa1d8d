"""Cost of the slide QC inside ``analyze_slide`` on CPU: each real slide analysed with the QC off and
on, alternately, several times (default model, default settings, fresh output each time); prints a
Markdown table of medians.

    .venv/bin/python benchmarks/bench_qc_cost.py [SLIDE_DIR]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from wsi_cmaf.infer import InferenceConfig, analyze_slide

SLIDES = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/data/slides"
#: the files without µm/px get the value the QC estimates for them
#: alternating QC-off / QC-on analyses per slide
REPEATS = 5
CASES = [("cmu_small_region.svs", None), ("cmu_small_region_pyramid_3level.tiff", None),
         ("tcga-cr-7395-01a-01-ts1.svs", 0.87), ("small_dicom.dcm", 1.3)]


def run(path: Path, mpp: float | None, qc: bool, out: Path) -> tuple[float, float, float, int]:
    t0, c0 = time.perf_counter(), time.process_time()
    res = analyze_slide(path, out=out, mpp=mpp, config=InferenceConfig(progress=False, qc=qc))
    return time.perf_counter() - t0, time.process_time() - c0, res.timings.get("qc", 0.0), res.tiles_tissue


def main() -> None:
    """Per slide, REPEATS alternating QC-off / QC-on analyses in one process; medians.

    "added wall" is what a user waits longer (on - off over off): the QC stage (``timings.qc``)
    plus writing its store group and drawing it on the overlay; "added CPU" is what it costs when
    other slides share the cores.
    """
    print("| slide | tissue tiles | analysis, QC off (s) | analysis, QC on (s) | added wall | QC stage (s) | "
          "added CPU (s) | CPU, QC off (s) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        run(SLIDES / CASES[0][0], None, False, Path(tmp) / "warm")  # model load and imports out of the timing
        for i, (name, mpp) in enumerate(CASES):
            rows: dict[bool, list[tuple[float, float, float, int]]] = {False: [], True: []}
            for rep in range(REPEATS):
                for qc in (False, True):
                    rows[qc].append(run(SLIDES / name, mpp, qc, Path(tmp) / f"{i}_{rep}_{qc}"))
            off, on = (statistics.median(r[0] for r in rows[q]) for q in (False, True))
            c_off, c_on = (statistics.median(r[1] for r in rows[q]) for q in (False, True))
            stage = statistics.median(r[2] for r in rows[True])
            print(f"| {name} | {rows[True][0][3]} | {off:.2f} | {on:.2f} | {(on - off) / off:+.1%} | {stage:.2f} | "
                  f"{c_on - c_off:+.2f} | {c_off:.2f} |", flush=True)


if __name__ == "__main__":
    main()
