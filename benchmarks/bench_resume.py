"""Cost of resuming a slide killed half way, against a full run (issue 13 §3: floor <= 0.6).

    .venv/bin/python benchmarks/bench_resume.py                                  # ResNet-18 @64, 40,000² slide
    .venv/bin/python benchmarks/bench_resume.py --model default --repeats 3      # the packaged default model

Method: the model is saved once (safetensors + config.json) so the killed run and the resumed run
load the same weights. Full runs go into fresh folders (``resume=False``); the median ``analyze_slide``
wall time is "full". Then a child process runs the same call and is killed with SIGKILL as soon as
its store's ``done`` flags reach ``--kill-at`` of the tissue blocks; the ``analyze_slide`` call that
resumes it (in this process, warm like the full runs) is "resume". Each repeat times one full run and
one kill + resume back to back; the floor is checked on the median of the per-pair ratios (the speed
of a shared machine drifts between minutes). The heatmap of every resumed store is checked
bit-identical to the full run's. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_cmaf.infer import InferenceConfig, analyze_slide  # noqa: E402
from wsi_cmaf.models import ModelConfig, create_model, save_model  # noqa: E402
from wsi_cmaf.slide.synthetic import write_synthetic_slide  # noqa: E402

CHILD = """
import json, sys
from wsi_cmaf.infer import InferenceConfig, analyze_slide
cfg = InferenceConfig(**json.loads(sys.argv[3]))
analyze_slide(sys.argv[1], model=None if sys.argv[4] == "default" else sys.argv[4], out=sys.argv[2], config=cfg)
"""


def prepare_model(name: str, workdir: Path) -> str:
    """A model path both processes load identically ("default": the packaged model)."""
    if name == "default":
        return "default"
    if name != "resnet18@64":
        raise SystemExit(f"unknown --model {name!r}; choose resnet18@64 or default")
    d = workdir / "bench_resume_resnet18_64"
    if not (d / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        module = create_model("timm:resnet18", num_classes=2, input_size=64)
        save_model(module, ModelConfig(architecture="timm:resnet18", input_size=64, stain_normalization="macenko",
                                       weights_note="untrained (benchmark)", model_kwargs={"input_size": 64}), d)
    return str(d)


def done_count(store: Path) -> int:
    try:
        return int(np.asarray(zarr.open_group(str(store), mode="r")["wsi_cmaf/done"]).sum())
    except (FileNotFoundError, KeyError, ValueError):
        return -1


def kill_half_way(slide: Path, out: Path, icfg: dict, model: str, blocks: int, kill_at: float) -> int:
    """Run the analysis in a child process and SIGKILL it once ``kill_at`` of the blocks are done."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(slide), str(out), json.dumps(icfg), model],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = out / f"{slide.stem}.zarr"
    target = max(1, round(kill_at * blocks))
    n = -1
    try:
        while proc.poll() is None:
            n = done_count(store)
            if n >= target:
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    n = done_count(store)
    if n < 1 or n >= blocks:
        raise SystemExit(f"the child was killed at {n}/{blocks} blocks, not part way: {err.decode()[-1500:]}")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18@64", help="resnet18@64 (saved once, untrained) or default")
    ap.add_argument("--size", type=int, nargs=2, default=[40000, 40000], metavar=("W", "H"))
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--block-tiles", type=int, default=8, help="tiles per block side (kill granularity)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of blocks done when the child is killed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_cmaf_bench")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    w, h = args.size
    slide = args.workdir / f"pipeline_{w}x{h}_{args.mpp}.tiff"  # the same cache as bench_pipeline.py
    if not slide.exists():
        partial = slide.with_name(slide.stem + ".partial.tiff")
        write_synthetic_slide(partial, w, h, args.mpp, seed=5, tumour=True)
        os.replace(partial, slide)
    model = prepare_model(args.model, args.workdir)
    icfg = dict(block_tiles=args.block_tiles, batch_size=args.batch_size, progress=False)
    config = InferenceConfig(**icfg)
    model_arg = None if model == "default" else model
    full_s, resume_s, killed_at, timings = [], [], [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        ref = analyze_slide(slide, model=model_arg, out=tmp / "ref", config=config)  # warm-up and reference
        probs = np.asarray(zarr.open_group(str(ref.store), mode="r")["0"])
        for i in range(args.repeats):
            t0 = time.perf_counter()
            analyze_slide(slide, model=model_arg, out=tmp / f"full{i}", config=config, resume=False)
            full_s.append(time.perf_counter() - t0)
            out = tmp / f"killed{i}"
            killed_at.append(kill_half_way(slide, out, icfg, model, ref.blocks_total, args.kill_at))
            t0 = time.perf_counter()
            res = analyze_slide(slide, model=model_arg, out=out, config=config)
            resume_s.append(time.perf_counter() - t0)
            timings.append(res.timings)
            assert res.blocks_skipped == killed_at[-1], (res.blocks_skipped, killed_at[-1])
            np.testing.assert_array_equal(np.asarray(zarr.open_group(str(res.store), mode="r")["0"]), probs)
    # per-pair ratios: a full run and its resume run back to back, so the drift of a shared machine
    # mostly cancels within a pair; the floor is checked on their median
    pairs = [r / f for r, f in zip(resume_s, full_s)]
    ratio = statistics.median(pairs)
    print(json.dumps({
        "bench": "resume", "model": args.model, "slide": str(slide), "tissue_tiles": ref.tiles_tissue,
        "blocks": ref.blocks_total, "block_tiles": args.block_tiles, "killed_at_blocks": killed_at,
        "killed_at_fraction": [round(k / ref.blocks_total, 3) for k in killed_at],
        "full_s": [round(t, 3) for t in full_s], "resume_s": [round(t, 3) for t in resume_s],
        "full_s_median": round(statistics.median(full_s), 3), "resume_s_median": round(statistics.median(resume_s), 3),
        "resume_over_full_pairs": [round(r, 3) for r in pairs],
        "resume_over_full": round(ratio, 3), "floor": {"max": 0.6, "ok": ratio <= 0.6},
        "full_timings_ref": ref.timings, "resume_timings_last": timings[-1], "bit_identical": True,
    }), flush=True)


if __name__ == "__main__":
    main()
