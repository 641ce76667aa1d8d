"""The GPU check's loop, batch and compile measurements, one JSON line each as soon as known.

    python benchmarks/gpu_loop.py loop --model cmaf_net@224 --slide S --repeats 3     # floor (c)
    python benchmarks/gpu_loop.py loop --model resnet18@64 --slide S --block-tiles 8  # floor (d), loop side
    python benchmarks/gpu_loop.py batch --workdir D --distinct 4 --copies 20          # floor (e)
    python benchmarks/gpu_loop.py compile --slide S                                   # first-slide compile time

``loop`` times the streaming stage alone (``stream_blocks``: read -> preprocess -> infer -> write,
after the reader pool, the stain fit and the reader opening) and the whole ``analyze_slide``,
each repeat between two model-only measurements (their mean cancels a drift of the device's
speed). ``batch`` runs CMAF-Net on ``--copies`` paths copied from ``--distinct`` slides on one
cluster, warmed by a slide first; its bound is one slide's fixed cost (measured on one slide
alone: its wall time less its tiles at the bound rate) plus the slide's tiles at the lower of the
model-only and decode rates. ``compile`` times a compiled runner's first block (the compile) and
its second. Runs on CPU too (the rehearsal), where CUDA graphs and compiles are not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from bench_pipeline import MODELS, model_only_tiles_per_s  # noqa: E402

import wsi_cmaf.infer.pipeline as pipeline_mod  # noqa: E402
from wsi_cmaf.device import resolve_device  # noqa: E402
from wsi_cmaf.infer import InferenceConfig, analyze_slide  # noqa: E402
from wsi_cmaf.infer.modelspec import resolve_model  # noqa: E402
from wsi_cmaf.infer.runner import BatchRunner  # noqa: E402
from wsi_cmaf.models import ModelConfig, create_model  # noqa: E402


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _resolved(name: str):
    reg, size, kw, _ = MODELS[name]
    cfg = ModelConfig(architecture=reg, input_size=size, stain_normalization="macenko",
                      weights_note="untrained (benchmark)", model_kwargs=kw)
    return resolve_model(create_model(reg, num_classes=2, **kw), cfg)


@contextlib.contextmanager
def stream_timer():
    """Seconds of every ``stream_blocks`` call, and blocks submitted to the model, meanwhile."""
    real_stream, real_submit = pipeline_mod.stream_blocks, BatchRunner.submit
    seen = {"stream_s": [], "blocks": 0}

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_stream(*args, **kwargs)
        finally:
            seen["stream_s"].append(time.perf_counter() - t0)

    def counted(self, tiles):
        seen["blocks"] += 1
        return real_submit(self, tiles)

    pipeline_mod.stream_blocks, BatchRunner.submit = timed, counted
    try:
        yield seen
    finally:
        pipeline_mod.stream_blocks, BatchRunner.submit = real_stream, real_submit


def _icfg(args, **extra) -> InferenceConfig:
    return InferenceConfig(device=args.device, batch_size=args.batch_size, progress=False, precision=args.precision,
                           compile=args.compile, reader_threads=args.reader_threads,
                           prefetch_blocks=args.prefetch, block_tiles=args.block_tiles, **extra)


def cmd_loop(args) -> None:
    resolved, device = _resolved(args.model), resolve_device(args.device)
    icfg = _icfg(args)
    with tempfile.TemporaryDirectory() as out:
        analyze_slide(args.slide, model=resolved, out=out, config=icfg, overwrite=True)  # warm-up, untimed
        for rep in range(args.repeats):
            before = model_only_tiles_per_s(resolved, args.batch_size, device, args.model_only_s, args.precision,
                                            args.compile)
            with stream_timer() as seen:
                t0 = time.perf_counter()
                res = analyze_slide(args.slide, model=resolved, out=out, config=icfg, overwrite=True,
                                    resume=False)
                e2e = time.perf_counter() - t0
            after = model_only_tiles_per_s(resolved, args.batch_size, device, args.model_only_s, args.precision,
                                           args.compile)
            model_tps, stream_s = (before + after) / 2, sum(seen["stream_s"])
            loop_tps = res.tiles_tissue / stream_s
            _emit({"bench": "loop", "model": args.model, "repeat": rep, "slide": Path(args.slide).name,
                   "device": str(device), "precision": args.precision, "compile": args.compile,
                   "batch_size": args.batch_size, "block_tiles": args.block_tiles,
                   "reader_threads": args.reader_threads, "tissue_tiles": res.tiles_tissue,
                   "blocks": seen["blocks"], "stream_s": round(stream_s, 3), "e2e_s": round(e2e, 3),
                   "loop_tiles_per_s": round(loop_tps, 1), "model_only_tiles_per_s": round(model_tps, 1),
                   "loop_over_model": round(loop_tps / model_tps, 3),
                   "e2e_tiles_per_s": round(res.tiles_tissue / e2e, 1)})


def _distinct_copies(distinct: list[Path], copies: int, folder: Path) -> list[Path]:
    """``copies`` paths copied round-robin from the distinct slides, each with a unique trailer.

    The batch engine analyses inputs that hold the same file (links, hard links, byte-identical
    copies) once, so plain links would time 4 slides, not ``copies``. Bytes after a TIFF's last
    IFD are never read, so the pixels stay those of the source slide.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(copies):
        p = folder / f"copy_{i:02d}.tiff"
        if not p.exists():
            partial = p.with_name(p.stem + ".partial")
            shutil.copyfile(distinct[i % len(distinct)], partial)
            with open(partial, "ab") as f:
                f.write(f"wsi-cmaf benchmark copy {i}\n".encode())
            os.replace(partial, p)
        paths.append(p)
    return paths


def _cluster(args):
    if args.device.startswith("cuda"):
        from wsi_cmaf.cluster.engine import make_local_cuda_cluster

        return make_local_cuda_cluster(slides_per_gpu=args.slides_in_flight)
    from distributed import LocalCluster

    return LocalCluster(n_workers=1, threads_per_worker=args.slides_in_flight, processes=True,
                        dashboard_address=None, host="127.0.0.1")


def cmd_batch(args) -> None:
    from bench_batch import decode_bound_tiles_per_s
    from distributed import Client

    from wsi_cmaf.cluster import analyze_slides
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    distinct = []
    for i in range(args.distinct):
        p = args.workdir / f"distinct_{args.size[0]}x{args.size[1]}_{i}.tiff"
        if not p.exists():
            partial = p.with_name(p.stem + ".partial.tiff")
            write_synthetic_slide(partial, args.size[0], args.size[1], args.mpp, seed=300 + i, tumour=True,
                                  workers=args.write_workers)
            os.replace(partial, p)
        distinct.append(p)
    paths = _distinct_copies(distinct, args.copies, args.workdir / "copies")
    if args.prepare_only:
        return
    resolved, device = _resolved("cmaf_net@224"), resolve_device(args.device)
    cfg = _icfg(args, overlay=False, geojson=True)
    model_tps = model_only_tiles_per_s(resolved, args.batch_size, device, args.model_only_s, args.precision,
                                       args.compile)
    decode_tps = decode_bound_tiles_per_s(distinct, args.slides_in_flight * args.reader_threads)
    bound_tps = min(model_tps, decode_tps)
    with _cluster(args) as cl, Client(cl) as client, tempfile.TemporaryDirectory() as out:
        run = dict(model=resolved.module, model_config=resolved.config, client=client, config=cfg, progress=False,
                   slides_per_gpu=args.slides_in_flight)
        analyze_slides([distinct[0]], Path(out) / "warm", **run)  # same cluster: the timed runs start warm
        t0 = time.perf_counter()
        alone = analyze_slides([distinct[1 % len(distinct)]], Path(out) / "alone", **run)
        alone_s = time.perf_counter() - t0
        alone_tiles = int(alone.rows[0]["tissue_tiles"] or 0)
        fixed_s = max(0.0, alone_s - alone_tiles / bound_tps)
        _emit({"bench": "batch_fixed_cost", "slide": distinct[1 % len(distinct)].name, "wall_s": round(alone_s, 3),
               "tissue_tiles": alone_tiles, "bound_tiles_per_s": round(bound_tps, 1),
               "fixed_s_per_slide": round(fixed_s, 3), "statuses": alone.counts})
        t0 = time.perf_counter()
        res = analyze_slides(paths, Path(out) / "run", **run)
        wall = time.perf_counter() - t0
    tiles = int(sum(int(r["tissue_tiles"] or 0) for r in res.rows))
    sph = 3600 * len(paths) / wall
    bound_s = len(paths) * fixed_s + tiles / bound_tps
    bound_sph = 3600 * len(paths) / bound_s
    _emit({"bench": "batch", "slides": len(paths), "distinct_slides": len(distinct), "size": args.size,
           "mpp": args.mpp, "device": str(device), "slides_in_flight": args.slides_in_flight,
           "reader_threads": args.reader_threads, "precision": args.precision, "compile": args.compile,
           "tissue_tiles": tiles, "wall_s": round(wall, 2), "slides_per_hour": round(sph, 1),
           "model_only_tiles_per_s": round(model_tps, 1), "decode_tiles_per_s": round(decode_tps, 1),
           "bound_applies": "decode" if decode_tps < model_tps else "model",
           "fixed_s_per_slide": round(fixed_s, 3), "bound_slides_per_hour": round(bound_sph, 1),
           "ratio_to_bound": round(sph / bound_sph, 3), "statuses": res.counts})


def cmd_compile(args) -> None:
    """A compiled runner's first block (Inductor compile of the one padded shape) vs its second."""
    import numpy as np

    resolved, device = _resolved(args.model), resolve_device(args.device)
    cfg = resolved.config
    from wsi_cmaf.preprocess import TilePreprocessor

    runner = BatchRunner(resolved.module, TilePreprocessor(cfg.input_size, cfg.mean, cfg.std), device,
                         args.batch_size, args.precision, compile=args.compile)
    tiles = np.random.default_rng(0).integers(0, 256, (args.batch_size + args.batch_size // 3, 50, 50, 3),
                                              dtype=np.uint8)  # a full batch and a partial one
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        runner(tiles)
        times.append(time.perf_counter() - t0)
    _emit({"bench": "first_block_compile", "model": args.model, "device": str(device), "compile": args.compile,
           "compiled": runner.compiled, "batch_size": args.batch_size, "shapes": sorted(
               {runner.padded(m) for m in (args.batch_size, args.batch_size // 3)}),
           "first_block_s": round(times[0], 3), "second_block_s": round(times[1], 3),
           "compile_s": round(times[0] - times[1], 3)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("loop", "batch", "compile"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "off"])
        p.add_argument("--compile", default="off")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--model-only-s", type=float, default=2.0)
        p.add_argument("--reader-threads", type=int, default=8)
        p.add_argument("--prefetch", type=int, default=16)
        p.add_argument("--block-tiles", type=int, default=32)
        p.add_argument("--model", default="cmaf_net@224", choices=list(MODELS))
        p.add_argument("--slide", type=Path)
        p.add_argument("--repeats", type=int, default=3)
    b = sub.choices["batch"]
    b.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_cmaf_gpu_batch")
    b.add_argument("--distinct", type=int, default=4)
    b.add_argument("--copies", type=int, default=20)
    b.add_argument("--size", type=int, nargs=2, default=[25000, 20000])
    b.add_argument("--mpp", type=float, default=1.0)
    b.add_argument("--slides-in-flight", type=int, default=4)
    b.add_argument("--write-workers", type=int, default=os.cpu_count() or 1)
    b.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "batch":
        args.workdir.mkdir(parents=True, exist_ok=True)
    elif args.cmd == "loop" and args.slide is None:
        ap.error("loop needs --slide")
    {"loop": cmd_loop, "batch": cmd_batch, "compile": cmd_compile}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
