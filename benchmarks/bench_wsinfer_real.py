r"""wsi-cmaf against the REAL WSInfer 0.6.1 CLI on one WSInfer model-zoo folder (issue 18 items 2 and 6).

Every run is a fresh subprocess that times itself after its imports, so both tools pay the same
cold start (first model call, page cache) and neither pays its import time:

* **wsinfer**: ``wsinfer run --wsi-dir D --results-dir R --config config.json --model-path
  torchscript_model.pt [--batch-size B]`` in WSInfer's own venv, called in-process through
  ``wsinfer.cli.cli.cli.main(...)``: its tissue segmentation, patching to HDF5, the DataLoader
  (``--num-workers`` left at WSInfer's default ``min(cpus, 8)`` unless ``--wsinfer-workers``),
  the model, the per-slide CSV, the run metadata and the GeoJSON. HOME points at a folder holding
  a placeholder model-zoo registry (``~/.wsinfer-zoo/wsinfer-zoo-registry.json``) and
  ``HF_HUB_OFFLINE=1``, so nothing is fetched. ``import wsinfer.cli.cli`` (which also loads the
  registry) is timed separately in the same process and reported as ``import_s``.
* **wsi-cmaf** (this venv), ``analyze_slide(slide, model=folder, config=InferenceConfig(...))``
  with the defaults except ``batch_size`` (``--batch-size``: 64 for both unless 0, which leaves each
  tool at its own default) and ``progress=False``, in these variants
  (``--variants``, see CMAF_VARIANTS): ``default`` (level-0 reads, chosen automatically for WSInfer
  folders; overlay PNG and GeoJSON on; ``precision="auto"``, i.e. bf16 on CPUs with native bf16),
  ``noexport`` (the same, overlay and GeoJSON off), ``pyramid`` (the model's config with
  ``patch_source="pyramid"``: tiles cut from the pyramid level, exports off), ``fp32`` (``noexport``
  with autocast off) and ``pyramid_fp32``.

Runs are interleaved (wsinfer, then each variant in order) ``--repeats`` times. Torch threads are
set to ``--threads`` in every process. Probabilities are compared tile by tile on the level-0
top-left corners both tools report (WSInfer's CSV ``minx, miny``; wsi-cmaf's ``x, y``); each tool
finds its own tissue, so the patch counts differ and the differences are over the common patches.
WSInfer puts patch k at ``k * round(pitch)`` level-0 px; where the pitch is fractional (real slides)
the corners drift apart, so patches are also matched by grid index (``same_index_*``, with the
largest corner offset). Results go to ``benchmarks/results/wsinfer/<label>.json`` with the load
average before and after every run; per-run logs and tables stay in ``--workdir``.

WSInfer's venv (outside the repository) and its offline HOME, once::

    python -m venv --system-site-packages /tmp/wsinfer-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/wsinfer-venv/lib/python3.11/site-packages/zz_main_venv.pth
    /tmp/wsinfer-venv/bin/pip install 'wsinfer==0.6.1' 'zarr<3' 'tiffslide<2.5' 'tifffile<2025'

The placeholder registry in ``--wsinfer-home`` is written by :func:`write_registry`. The ``.pth``
line appends this venv's site-packages (torch, torchvision) after the WSInfer venv's own, so
WSInfer's pinned zarr 2 / tiffslide 2.4 / tifffile 2024 win and torch is not downloaded twice. Then::

    .venv/bin/python benchmarks/bench_wsinfer_real.py --size 20000 --input-sizes 64 --repeats 2
    .venv/bin/python benchmarks/bench_wsinfer_real.py --size 20000 --input-sizes 224 --variants default noexport fp32
    .venv/bin/python benchmarks/bench_wsinfer_real.py --slide /work/shared/data/slides/cmu_small_region.svs \
        --input-sizes 224 --patch-px 224 --spacing 0.5 --variants noexport pyramid fp32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wsinfer import make_zoo_folder  # noqa: E402  (same zoo folder as the reference-loop benchmark)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "wsinfer"

# Runs inside WSInfer's venv: argv = [threads, out_json, *wsinfer_cli_args].
_WSINFER_INNER = """
import json, sys, time
t0 = time.perf_counter()
import torch
import wsinfer.cli.cli as wcli
import_s = time.perf_counter() - t0
torch.set_num_threads(int(sys.argv[1]))
t1 = time.perf_counter()
wcli.cli.main(sys.argv[3:], standalone_mode=False)
run_s = time.perf_counter() - t1
import wsinfer
json.dump({"import_s": import_s, "run_s": run_s, "version": wsinfer.__version__,
           "torch_threads": torch.get_num_threads()}, open(sys.argv[2], "w"))
"""

# Runs in this venv: argv = [params_json]; times analyze_slide only, then writes the tile table.
_CMAF_INNER = """
import dataclasses, json, sys, time
p = json.loads(sys.argv[1])
t0 = time.perf_counter()
import torch
from wsi_cmaf.device import autocast_dtype
from wsi_cmaf.infer.config import InferenceConfig
from wsi_cmaf.infer.pipeline import analyze_slide
from wsi_cmaf.models.wsinfer import translate_wsinfer_config
import_s = time.perf_counter() - t0
torch.set_num_threads(p["threads"])
kw = {"batch_size": p["batch_size"]} if p["batch_size"] else {}  # 0: wsi-cmaf's own default
cfg = InferenceConfig(progress=False, overlay=p["exports"], geojson=p["exports"], precision=p["precision"], **kw)
model, model_config = p["folder"], None
if p["source"] == "pyramid":  # the same TorchScript, its config read from the pyramid level
    data = json.load(open(p["folder"] + "/config.json"))
    model_config = dataclasses.replace(translate_wsinfer_config(data, p["folder"]), patch_source="pyramid")
    model = p["folder"] + "/torchscript_model.pt"
t1 = time.perf_counter()
result = analyze_slide(p["slide"], model=model, model_config=model_config, out=p["out"], config=cfg, overwrite=True)
run_s = time.perf_counter() - t1
result.tiles().to_csv(p["tiles_csv"], index=False)
json.dump({"import_s": import_s, "run_s": run_s, "timings": result.timings, "batch_size": cfg.batch_size,
           "autocast_dtype": str(autocast_dtype(torch.device("cpu"), cfg.precision)),
           "torch_threads": torch.get_num_threads()}, open(p["json"], "w"))
"""

#: variant -> (read mode, overlay+GeoJSON, precision); "auto" is bf16 only on CPUs with native bf16
CMAF_VARIANTS = {"default": ("level0", True, "auto"), "noexport": ("level0", False, "auto"),
                 "pyramid": ("pyramid", False, "auto"), "fp32": ("level0", False, "off"),
                 "pyramid_fp32": ("pyramid", False, "off")}
DEFAULT_VARIANTS = ["default", "noexport", "pyramid", "fp32"]


def write_registry(home: Path) -> Path:
    """A one-entry WSInfer model-zoo registry so ``import wsinfer.cli`` works offline (the CLI builds
    its ``--model`` choices from it at import time); the benchmark itself passes --config/--model-path."""
    path = home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"description": "placeholder: lets WSInfer import offline", "hf_repo_id": "none/none",
             "hf_revision": "main"}
    path.write_text(json.dumps({"models": {"local-placeholder": entry}}), encoding="utf-8")
    return path


def loadavg() -> float:
    """1-minute load average (the machine is shared: every timing records it)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_wsinfer(args: argparse.Namespace, slide: Path, folder: Path, work: Path, tag: str) -> dict:
    """One ``wsinfer run`` on a folder holding only ``slide``; returns its timings and probability table."""
    wsi_dir = work / "wsinfer_wsi"
    if not (wsi_dir / slide.name).exists():
        wsi_dir.mkdir(parents=True, exist_ok=True)
        (wsi_dir / slide.name).symlink_to(slide.resolve())
    results_dir = work / f"wsinfer_out_{tag}"
    shutil.rmtree(results_dir, ignore_errors=True)  # WSInfer skips slides whose CSV exists
    out_json = work / f"wsinfer_{tag}.json"
    cli_args = ["run", "--wsi-dir", str(wsi_dir), "--results-dir", str(results_dir),
                "--config", str(folder / "config.json"), "--model-path", str(folder / "torchscript_model.pt")]
    if args.batch_size:  # 0: WSInfer's own default (32)
        cli_args += ["--batch-size", str(args.batch_size)]
    if args.wsinfer_workers is not None:
        cli_args += ["--num-workers", str(args.wsinfer_workers)]
    env = {**os.environ, "HOME": str(args.wsinfer_home), "HF_HUB_OFFLINE": "1", "WSINFER_FORCE_CPU": "1"}
    load0, t0 = loadavg(), time.perf_counter()
    with open(work / f"wsinfer_{tag}.log", "w") as log:
        subprocess.run([str(args.wsinfer_python), "-c", _WSINFER_INNER, str(args.threads), str(out_json), *cli_args],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=work)
    wall = time.perf_counter() - t0
    info = json.loads(out_json.read_text())
    table = pd.read_csv(results_dir / "model-outputs-csv" / f"{slide.stem}.csv")
    return {**info, "process_wall_s": wall, "load_before": load0, "load_after": loadavg(), "table": table}


def run_cmaf(args: argparse.Namespace, slide: Path, folder: Path, work: Path, variant: str, tag: str) -> dict:
    """One fresh-process ``analyze_slide`` in ``variant`` (see CMAF_VARIANTS)."""
    source, exports, precision = CMAF_VARIANTS[variant]
    params = {"slide": str(slide), "folder": str(folder), "out": str(work / f"cmaf_out_{variant}"),
              "threads": args.threads, "batch_size": args.batch_size, "source": source, "exports": exports,
              "precision": precision,
              "tiles_csv": str(work / f"cmaf_{variant}_{tag}.csv"), "json": str(work / f"cmaf_{variant}_{tag}.json")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    load0, t0 = loadavg(), time.perf_counter()
    with open(work / f"cmaf_{variant}_{tag}.log", "w") as log:
        subprocess.run([sys.executable, "-c", _CMAF_INNER, json.dumps(params)], env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True, cwd=work)
    wall = time.perf_counter() - t0
    info = json.loads(Path(params["json"]).read_text())
    return {**info, "process_wall_s": wall, "load_before": load0, "load_after": loadavg(),
            "table": pd.read_csv(params["tiles_csv"])}


def compare(wsinfer: pd.DataFrame, cmaf: pd.DataFrame, classes: list[str]) -> dict:
    """Patch counts and |Δ probability| over the patches both tools found (matched on level-0 x, y)."""
    cm = cmaf.dropna(subset=[f"prob_{c}" for c in classes])
    merged = wsinfer.merge(cm, left_on=["minx", "miny"], right_on=["x", "y"], suffixes=("_wsinfer", "_cmaf"))
    out = {"patches_wsinfer": int(len(wsinfer)), "patches_wsi_cmaf": int(len(cm)), "patches_common": int(len(merged))}
    if len(merged):
        size_match = bool((merged["width"] == merged["w"]).all() and (merged["height"] == merged["h"]).all())
        d = np.abs(np.stack([merged[f"prob_{c}_wsinfer"] - merged[f"prob_{c}_cmaf"] for c in classes]))
        out.update(region_sizes_equal=size_match, prob_max_abs_diff=float(d.max()), prob_mean_abs_diff=float(d.mean()))
    # WSInfer's patch k starts at k * round(pitch); where the pitch is not a whole number of level-0 px
    # the two tools' corners drift apart, so also match by grid index and report the corner offset
    ws = wsinfer.assign(col=wsinfer["minx"] // wsinfer["width"], row=wsinfer["miny"] // wsinfer["height"])
    by_index = ws.merge(cm, on=["row", "col"], suffixes=("_wsinfer", "_cmaf"))
    if len(by_index):
        d = np.abs(np.stack([by_index[f"prob_{c}_wsinfer"] - by_index[f"prob_{c}_cmaf"] for c in classes]))
        offset = np.maximum(np.abs(by_index["minx"] - by_index["x"]), np.abs(by_index["miny"] - by_index["y"]))
        out.update(patches_same_index=int(len(by_index)), same_index_max_corner_offset_px=int(offset.max()),
                   same_index_prob_max_abs_diff=float(d.max()), same_index_prob_mean_abs_diff=float(d.mean()))
    return out


def _summary(runs: list[dict], key: str) -> dict:
    vals = [r[key] for r in runs]
    return {"all": [round(v, 2) for v in vals], "best": round(min(vals), 2), "median": round(float(np.median(vals)), 2)}


def bench_one(args: argparse.Namespace, slide: Path, input_size: int) -> dict:
    """Interleaved runs for one model input size; returns the JSON-able report row."""
    folder = make_zoo_folder(args.workdir, input_size, args.patch_px, args.spacing)
    classes = json.loads((folder / "config.json").read_text())["class_names"]
    work = args.workdir / f"{slide.stem}_{folder.name}"
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"wsinfer": [], **{v: [] for v in args.variants}}
    for rep in range(args.repeats):
        runs["wsinfer"].append(run_wsinfer(args, slide, folder, work, f"r{rep}"))
        for variant in args.variants:
            runs[variant].append(run_cmaf(args, slide, folder, work, variant, f"r{rep}"))
    ref = runs["wsinfer"][-1]
    row = {"input_px": input_size, "model_folder": folder.name, "wsinfer_version": ref["version"],
           "wsinfer_run_s": _summary(runs["wsinfer"], "run_s"),
           "wsinfer_import_s": _summary(runs["wsinfer"], "import_s"),
           "wsinfer_process_wall_s": _summary(runs["wsinfer"], "process_wall_s"),
           "load": [[r["load_before"], r["load_after"]] for rs in runs.values() for r in rs]}
    ref_s = [r["run_s"] for r in runs["wsinfer"]]
    for variant in args.variants:
        rs = runs[variant]
        ours_s = [r["run_s"] for r in rs]
        row[variant] = {"run_s": _summary(rs, "run_s"), "import_s": _summary(rs, "import_s"),
                        "speedup_vs_wsinfer_best": round(min(ref_s) / min(ours_s), 2),
                        "speedup_vs_wsinfer_median": round(float(np.median(ref_s) / np.median(ours_s)), 2),
                        "autocast_dtype": rs[-1]["autocast_dtype"], "batch_size": rs[-1]["batch_size"],
                        "timings_last": rs[-1]["timings"], **compare(ref["table"], rs[-1]["table"], classes)}
    if "noexport" in runs and "pyramid" in runs:
        a, b = runs["noexport"][-1]["table"], runs["pyramid"][-1]["table"]
        m = a.merge(b, on=["x", "y"], suffixes=("_l0", "_pyr")).dropna()
        d = np.abs(np.stack([m[f"prob_{c}_l0"] - m[f"prob_{c}_pyr"] for c in classes]))
        row["level0_vs_pyramid"] = {"patches_common": int(len(m)), "prob_max_abs_diff": float(d.max()),
                                    "prob_mean_abs_diff": float(d.mean())}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="synthetic slide side (level-0 px)")
    ap.add_argument("--mpp", type=float, default=1.0, help="synthetic slide µm/px (1.0: 200 px regions)")
    ap.add_argument("--slide", type=Path, default=None, help="a real slide with µm/px instead of the synthetic one")
    ap.add_argument("--input-sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--patch-px", type=int, default=50, help="model config patch_size_pixels")
    ap.add_argument("--spacing", type=float, default=4.0, help="model config spacing_um_px")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="for both tools (64: issue 18's setting); 0: each tool's own default "
                         "(WSInfer 32, wsi-cmaf 256)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    ap.add_argument("--wsinfer-workers", type=int, default=None, help="WSInfer --num-workers (default: its own)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(CMAF_VARIANTS))
    ap.add_argument("--wsinfer-python", type=Path, default=Path("/tmp/wsinfer-venv/bin/python"))
    ap.add_argument("--wsinfer-home", type=Path, default=Path("/tmp/wsinfer-home"))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_cmaf_bench_wsinfer")
    ap.add_argument("--label", default=None, help="results file name (default: from the slide and sizes)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    write_registry(args.wsinfer_home)
    if args.slide is not None:
        slide = args.slide
    else:
        from wsi_cmaf.slide.synthetic import write_synthetic_slide

        slide = args.workdir / f"synthetic_{args.size}_{args.mpp:g}.tiff"
        if not slide.is_file():
            write_synthetic_slide(slide, args.size, args.size, args.mpp, seed=0, workers=args.threads)
    report = {"slide": str(slide), "size": None if args.slide else args.size, "threads": args.threads,
              "batch_size": args.batch_size, "patch_px": args.patch_px, "spacing_um_px": args.spacing,
              "wsinfer_workers": args.wsinfer_workers or "default (min(cpus, 8))",
              "cpus": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "loadavg_start": Path("/proc/loadavg").read_text().strip(), "results": []}
    for input_size in args.input_sizes:
        row = bench_one(args, slide, input_size)
        print(json.dumps(row), flush=True)
        report["results"].append(row)
    report["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    RESULTS.mkdir(parents=True, exist_ok=True)
    label = args.label or f"{slide.stem}_{'_'.join(map(str, args.input_sizes))}"
    (RESULTS / f"{label}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"wrote {RESULTS / (label + '.json')}")


if __name__ == "__main__":
    main()
