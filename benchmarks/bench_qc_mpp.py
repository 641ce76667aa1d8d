"""µm/px estimated from nuclei on the real slides and on copies resampled by 2 and 4 without metadata.

Writes the resampled copies as plain tiled TIFFs (no resolution tags, no description) to a
temporary folder and opens them like any slide. Prints one Markdown table row per case.

    .venv/bin/python benchmarks/bench_qc_mpp.py [SLIDE_DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from wsi_cmaf.qc.mpp_estimate import estimate_mpp
from wsi_cmaf.slide import open_slide

SLIDES = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/data/slides"


def resampled_copy(src: Path, factor: int, out: Path) -> float:
    """Level 0 of ``src`` reduced by ``factor`` (box average; a negative one enlarges) as a metadata-free TIFF;
    returns its true µm/px."""
    with open_slide(src) as r:
        w, h = r.level_dimensions[0]
        rgb = r.read_region((0, 0), 0, (w, h))
        mpp = r.mpp[0]
    if factor > 0:
        small = np.asarray(Image.fromarray(rgb).reduce(factor))
    else:  # a negative factor enlarges: -2 doubles the size (Lanczos), like a 40x scan of a 20x one
        small = np.asarray(Image.fromarray(rgb).resize((w * -factor, h * -factor), Image.Resampling.LANCZOS))
    tifffile.imwrite(out, small, tile=(256, 256), photometric="rgb", compression="zlib")
    return mpp * w / small.shape[1]


def main() -> None:
    cases = []
    for name in ("cmu_small_region.svs", "cmu_small_region_pyramid_3level.tiff"):
        with open_slide(SLIDES / name) as r:
            cases.append((name, SLIDES / name, r.mpp[0]))
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cmu_small_region.svs", "cmu_small_region_pyramid_3level.tiff"):
            for factor in (2, 4):
                out = Path(tmp) / f"{Path(name).stem}_x{factor}.tiff"
                cases.append((f"{name} resampled /{factor}, no metadata", out,
                              resampled_copy(SLIDES / name, factor, out)))
        out = Path(tmp) / "cmu_up2.tiff"
        cases.append(("cmu_small_region.svs enlarged x2 (Lanczos), no metadata", out,
                      resampled_copy(SLIDES / "cmu_small_region.svs", -2, out)))
        for name in ("tcga-cr-7395-01a-01-ts1.svs", "small_dicom.dcm"):
            cases.append((name, SLIDES / name, None))
        print("| slide | true µm/px | estimate | interval | error | nuclei / tiles | seconds |")
        print("|---|---|---|---|---|---|---|")
        for name, path, truth in cases:
            with open_slide(path) as r:
                t0 = time.perf_counter()
                est = estimate_mpp(r)
                dt = time.perf_counter() - t0
            err = f"{(est.mpp / truth - 1) * 100:+.1f} %" if truth else "n/a"
            tv = f"{truth:.4g}" if truth else "none"
            print(f"| {name} | {tv} | {est.mpp:.3f} | {est.interval[0]:.3f}-{est.interval[1]:.3f} | {err} | "
                  f"{est.n_nuclei} / {est.n_tiles} | {dt:.2f} |")


if __name__ == "__main__":
    main()
