"""Cohort throughput: slides/hour of ``wsi-cmaf batch`` and ``analyze_slides`` against the decode bound.

    .venv/bin/python benchmarks/bench_cohort.py            # 20 slides of 24,000 x 20,000 px, three models
    .venv/bin/python benchmarks/bench_cohort.py --quick    # 6 smaller slides, zero-cost model only (~1 min)

Slides: ``--distinct`` synthetic Aperio-style TIFFs (0.25 µm/px) written once under
``~/.cache/wsi-cmaf/bench_cohort/`` and reused; the cohort of ``--slides`` cycles through them as
byte copies with a unique trailer each, so the batch engine's same-file check
(:mod:`wsi_cmaf.cluster.inputs`) analyses every one.

Models (``--models``):

* ``zero``: a WSInfer-style folder (224 px at 0.5 µm/px, level-0 448 px reads resized to 224)
  whose TorchScript forward returns the tile mean: the model costs nothing, the rest is measured;
* ``cmaf_net@224``: CMAF-Net at 224 px input (untrained), 50 px tiles at 4 µm/px with stain fit;
* ``default``: the project's packaged model.

Per model one JSON line: slides/hour of the CLI (a subprocess) and of the Python call (both on
the default local cluster: 2 worker processes, each with 2 slides in flight and 1 reader thread
per slide, so 4 reader threads in all), the decode bound (every tissue block of the same grids
read by :func:`wsi_cmaf.slide.read_block` and its tiles resized to the model's input by the
project's preprocessor, on the same number of threads, nothing else; measured before and after
the two runs and averaged, with their spread), the model bound (model-only tiles/s on the same
cores, for models that are not free), each ratio to the lower bound, the CPU seconds of the CLI
run (all its processes) against those of the decode bound, and the median per-slide seconds of
each stage from the slides' summary JSON (``timings``). The last line holds
``ratio_to_decode_bound`` of the zero-cost model (the lower of the CLI's and the Python call's)
and the 0.8 floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsi-cmaf" / "bench_cohort"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FLOOR = 0.8
#: stages of the summary's ``timings`` that are per-slide fixed work, not the streaming of tiles
STREAMING = ("inference",)


def cohort(size: tuple[int, int], distinct: int, n: int, mpp: float = 0.25) -> list[Path]:
    """``n`` slide paths cycling through ``distinct`` cached synthetic slides, each copy with its own bytes."""
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    folder = CACHE / f"{size[0]}x{size[1]}_{mpp:g}um"
    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for i in range(distinct):
        p = folder / f"base_{i}.tiff"
        if not p.exists():
            partial = p.with_name(p.stem + ".partial.tiff")  # an interrupted write is no cache
            write_synthetic_slide(partial, size[0], size[1], mpp, seed=300 + i, tumour=True, save_mask=False,
                                  workers=os.cpu_count() or 1)
            os.replace(partial, p)
        bases.append(p)
    slides = []
    for j in range(n):
        p = folder / f"slide_{j:03d}.tiff"
        if not p.exists():
            partial = p.with_name(p.stem + ".partial")
            shutil.copyfile(bases[j % distinct], partial)
            with open(partial, "ab") as fh:  # TIFF readers ignore bytes past the last IFD
                fh.write(f"wsi-cmaf-bench-cohort-copy-{j:03d}".encode())
            os.replace(partial, p)
        slides.append(p)
    return slides


def zero_cost_folder(root: Path) -> Path:
    """A WSInfer model folder (224 px at 0.5 µm/px) whose TorchScript forward is the tile mean."""
    import torch
    from torch import nn

    class TileMean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, -m], 1)

    folder = root / "zero_cost"
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(TileMean()).save(str(folder / "torchscript_model.pt"))
    config = {"spec_version": "1.0", "architecture": "tile-mean", "num_classes": 2,
              "class_names": ["a", "b"], "patch_size_pixels": 224, "spacing_um_px": 0.5,
              "transform": [{"name": "Resize", "arguments": {"size": 224}}, {"name": "ToTensor"},
                            {"name": "Normalize", "arguments": {"mean": MEAN, "std": STD}}]}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def cmaf_folder(root: Path) -> Path:
    """CMAF-Net at 224 px input (untrained weights), saved as a model folder the CLI can load."""
    from wsi_cmaf.models import ModelConfig, create_model
    from wsi_cmaf.models.io import save_model

    cfg = ModelConfig(architecture="cmaf_net", input_size=224, stain_normalization="macenko",
                      weights_note="untrained (benchmark)")
    return save_model(create_model("cmaf_net", num_classes=2, input_size=224), cfg, root / "cmaf_net_224")


def _grids(slides: list[Path], mc):
    """(slide path, pixel backend, grid) of each slide, built as ``analyze_slide`` builds them for ``mc``."""
    from wsi_cmaf.infer.config import InferenceConfig
    from wsi_cmaf.slide.grid import GridConfig, TileGrid
    from wsi_cmaf.slide.level0 import block_tiles_for_level0
    from wsi_cmaf.slide.reader import open_slide
    from wsi_cmaf.slide.tissue import TissueConfig, detect_tissue

    try:
        from wsi_cmaf.slide.reads import block_read_backend
    except ImportError:  # before block reads had a module of their own
        from wsi_cmaf.slide.grid import block_read_backend

    icfg = InferenceConfig()
    out = []
    for p in slides:
        with open_slide(p) as r:
            bt = icfg.block_tiles if mc.patch_source == "pyramid" else block_tiles_for_level0(
                icfg.block_tiles, mc.patch_size_pixels, mc.spacing_um_px, tuple(r.mpp))
            gcfg = GridConfig(mpp=mc.spacing_um_px, tile_size=mc.patch_size_pixels,
                              tissue_threshold=icfg.tissue_threshold, source=mc.patch_source, block_tiles=bt)
            out.append((p, block_read_backend(r), TileGrid.from_slide(r, gcfg, detect_tissue(r, TissueConfig()))))
    return out


def decode_bound(slides: list[Path], model: Path | None, threads: int) -> dict:
    """Tissue tiles/s and slides/hour of reading every tissue block of the slides and resizing its
    tiles to the model's input, on ``threads`` threads with one torch thread each, nothing else.

    Reads are :func:`~wsi_cmaf.slide.read_block` (one reader per thread and slide, the block
    backend ``analyze_slide`` picks); the resize is the project's tile preprocessor without stain
    normalisation (level-0 grids come out of the reads at their level-0 size).
    """
    import torch

    from wsi_cmaf.infer.modelspec import resolve_model
    from wsi_cmaf.slide import read_block

    try:
        from wsi_cmaf.preprocess import TilePreprocessor
    except ImportError:  # where it lived before the device helpers moved out of the runner
        from wsi_cmaf.infer.runner import TilePreprocessor
    from wsi_cmaf.slide.reader import open_slide

    mc = resolve_model(model).config
    grids = _grids(slides, mc)
    pre = TilePreprocessor(mc.input_size, tuple(mc.mean), tuple(mc.std), mc.resize_interpolation, None)
    local = threading.local()

    def read(item) -> int:
        path, backend, grid, block = item
        readers = getattr(local, "readers", None)
        if readers is None:
            readers = local.readers = {}
        if path not in readers:  # one reader per thread and slide, as the reader tasks keep them
            readers[path] = open_slide(path, backend=backend)
        tiles = read_block(readers[path], grid, block).tiles
        if len(tiles):
            with torch.inference_mode():
                pre(torch.from_numpy(tiles))
        return len(tiles)

    work = [(p, b, g, blk) for p, b, g in grids for blk in g.blocks]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the batch's worker processes (dask sets OMP_NUM_THREADS=1)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            tiles = sum(pool.map(read, work))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(before)
    return {"tiles": tiles, "tiles_per_s": tiles / wall, "slides_per_hour": 3600 * len(slides) / wall, "cpu_s": cpu,
            "threads": threads}


def model_bound(model: Path | None, tiles: int, n_slides: int) -> dict | None:
    """Model-only tiles/s on this process's torch threads, as slides/hour for ``tiles`` tiles."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_pipeline import model_only_tiles_per_s

    from wsi_cmaf.infer.modelspec import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    tps = model_only_tiles_per_s(resolve_model(model), 256, torch.device("cpu"), 3.0, "auto")
    return {"tiles_per_s": tps, "slides_per_hour": 3600 * n_slides / (tiles / tps)}


def run_cli(slides: list[Path], model: Path | None, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds (the process and every process it started) of ``wsi-cmaf batch`` over
    ``slides``, in a fresh process as a user runs it."""
    cmd = [str(Path(sys.executable).with_name("wsi-cmaf")), "-q", "batch", *map(str, slides), "--out", str(out),
           "--no-progress"]
    if model is not None:
        cmd += ["--model", str(model)]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wsi-cmaf batch failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return wall, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def run_api(slides: list[Path], model: Path | None, out: Path) -> float:
    """Wall seconds of ``wsi_cmaf.analyze_slides`` over ``slides`` with its defaults."""
    from wsi_cmaf import analyze_slides

    t0 = time.perf_counter()
    res = analyze_slides(slides, out, model=model, progress=False)
    wall = time.perf_counter() - t0
    if res.counts.get("done", 0) != len(slides):
        raise RuntimeError(f"analyze_slides did not finish every slide: {res.counts}")
    return wall


def stage_medians(out: Path) -> dict[str, float]:
    """Median seconds per slide of every stage in the summaries under ``out``."""
    per_stage: dict[str, list[float]] = {}
    for summary in out.glob("*/*_summary.json"):
        for k, v in json.loads(summary.read_text(encoding="utf-8"))["timings"].items():
            per_stage.setdefault(k, []).append(float(v))
    return {k: round(statistics.median(v), 4) for k, v in sorted(per_stage.items())}


def bench_model(name: str, model: Path | None, slides: list[Path], work: Path, threads: int) -> dict:
    """One JSON-able record: both entry points against the decode (and model) bound."""
    for kind in ("cli", "api"):  # a leftover status table would make the run a no-op rerun
        shutil.rmtree(work / f"{name}_{kind}", ignore_errors=True)
    # the bound before and after the runs, averaged: a shared machine's speed drifts
    first = decode_bound(slides, model, threads)
    cli_wall, cli_cpu = run_cli(slides, model, work / f"{name}_cli")
    api_wall = run_api(slides, model, work / f"{name}_api")
    last = decode_bound(slides, model, threads)
    decode = {k: (first[k] + last[k]) / 2 for k in ("tiles_per_s", "slides_per_hour", "cpu_s")}
    spread = abs(first["tiles_per_s"] - last["tiles_per_s"]) / decode["tiles_per_s"]
    decode.update(tiles=first["tiles"], spread=spread)
    model_b = None if name == "zero" else model_bound(model, decode["tiles"], len(slides))
    bound = min(decode["slides_per_hour"], model_b["slides_per_hour"] if model_b else float("inf"))
    stages = stage_medians(work / f"{name}_api")
    fixed = round(sum(v for k, v in stages.items() if k not in STREAMING), 4)
    cli_sph, api_sph = 3600 * len(slides) / cli_wall, 3600 * len(slides) / api_wall
    return {
        "bench": "cohort", "model": name, "slides": len(slides), "tissue_tiles": decode["tiles"],
        "cli_wall_s": round(cli_wall, 2), "cli_slides_per_hour": round(cli_sph, 1),
        "api_wall_s": round(api_wall, 2), "api_slides_per_hour": round(api_sph, 1),
        "decode_threads": threads, "decode_tiles_per_s": round(decode["tiles_per_s"], 1),
        "decode_bound_slides_per_hour": round(decode["slides_per_hour"], 1),
        "decode_before_after_spread": round(decode["spread"], 3),
        # CPU seconds are less disturbed by other load than wall time: the batch's extra work itself
        "cli_cpu_s": round(cli_cpu, 2), "decode_cpu_s": round(decode["cpu_s"], 2),
        "decode_cpu_over_cli_cpu": round(decode["cpu_s"] / cli_cpu, 3),
        "model_bound_slides_per_hour": round(model_b["slides_per_hour"], 1) if model_b else None,
        "model_only_tiles_per_s": round(model_b["tiles_per_s"], 1) if model_b else None,
        "cli_ratio_to_bound": round(cli_sph / bound, 3), "api_ratio_to_bound": round(api_sph / bound, 3),
        "cli_ratio_to_decode_bound": round(cli_sph / decode["slides_per_hour"], 3),
        "api_ratio_to_decode_bound": round(api_sph / decode["slides_per_hour"], 3),
        "median_stage_s": stages, "median_fixed_s": fixed,
    }


def main() -> None:
    """Parse the options, prepare slides and models, print one JSON line per model and the floor."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 slides of 16,000 x 14,000 px, zero-cost model only")
    ap.add_argument("--slides", type=int, default=None, help="cohort size (default 20; --quick 6)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct synthetic slides (at least 4)")
    ap.add_argument("--size", type=int, nargs=2, default=None, help="level-0 px (default 24000 20000)")
    ap.add_argument("--models", nargs="+", default=None, choices=["zero", "cmaf_net@224", "default"])
    ap.add_argument("--threads", type=int, default=4,
                    help="decode-bound threads: the batch's reader threads (default local cluster: 2 workers "
                         "x 2 slides in flight x 1 reader thread)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the outputs in this folder")
    args = ap.parse_args()
    if args.distinct < 4:
        ap.error("--distinct must be at least 4")
    n = args.slides or (6 if args.quick else 20)
    size = tuple(args.size or ((16000, 14000) if args.quick else (24000, 20000)))
    models = args.models or (["zero"] if args.quick else ["zero", "cmaf_net@224", "default"])
    if "zero" in models:  # the checked line comes last
        models = [m for m in models if m != "zero"] + ["zero"]
    slides = cohort(size, args.distinct, n)
    work = Path(tempfile.mkdtemp(prefix="wsi_cmaf_cohort_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        folders = {"zero": lambda: zero_cost_folder(work), "cmaf_net@224": lambda: cmaf_folder(work),
                   "default": lambda: None}
        last = None
        for name in models:
            rec = bench_model(name, folders[name](), slides, work, args.threads)
            rec.update(size=list(size), load_avg=[round(x, 2) for x in os.getloadavg()], cpu_count=os.cpu_count())
            print(json.dumps(rec), flush=True)
            if name == "zero":
                last = rec
        if last is not None:
            ratio = min(last["cli_ratio_to_decode_bound"], last["api_ratio_to_decode_bound"])
            print(json.dumps({"bench": "cohort_floor", "model": "zero", "slides": n, "size": list(size),
                              "ratio_to_decode_bound": ratio, "floor": FLOOR, "ok": ratio >= FLOOR,
                              "load_avg": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
