"""Foundation-model encoder throughput: tiles/s end to end (``embed_slide`` on a synthetic slide)
against the same encoder alone, at its native input, with the precision and batch it ran with.

    python benchmarks/bench_encoders.py                                  # Phikon (ViT-B/16 @224) on CPU
    python benchmarks/bench_encoders.py --encoders phikon uni --repeats 2
    python benchmarks/bench_encoders.py --device cuda --encoders phikon uni virchow2 h-optimus-0 \
        --size 30000 30000 --batch-size 256 --compile on --gpu-util      # GPU stage (gpu_encoders.py)

One JSON line per encoder and repeat, then a summary line per encoder. Weights are random (the
architectures are exact; throughput does not depend on the values). "e2e" is the whole
``embed_slide`` call with the encoder already loaded (open, tissue mask, grid, reads, resampling,
normalisation, the encoder, float16 Zarr writes, pyramid of the coverage map, summary).
"model-only" runs the same engine-prepared module (``BatchRunner``: same device, autocast, compile
and normalisation) over uint8 tiles already in memory, in exactly the batch sizes the e2e run used
(each block's tissue tiles split into equal batches <= --batch-size), measured right before and
right after each e2e run; ratio = e2e tiles/s / mean of the two, so the drift of a shared machine
cancels within a pair. ``--gpu-util`` samples ``nvidia-smi`` utilisation during the e2e run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_cmaf.device import autocast_dtype, resolve_device  # noqa: E402
from wsi_cmaf.encoders.embed import embed_slide, encoder_model  # noqa: E402
from wsi_cmaf.encoders.loader import load_encoder  # noqa: E402
from wsi_cmaf.infer import InferenceConfig  # noqa: E402
from wsi_cmaf.infer.embeddings import with_embeddings  # noqa: E402
from wsi_cmaf.infer.runner import BatchRunner  # noqa: E402
from wsi_cmaf.output.store import HeatmapStore  # noqa: E402
from wsi_cmaf.preprocess import TilePreprocessor  # noqa: E402
from wsi_cmaf.slide.synthetic import write_synthetic_slide  # noqa: E402


def batch_sizes(store: HeatmapStore, batch: int) -> list[int]:
    """The batch sizes the engine ran: per block, its tissue tiles split into equal batches <= batch."""
    tissue = store.tissue(0)
    (k0, k1), (rows, cols) = store.chunk, store.grid_shape
    sizes = []
    for r in range(0, rows, k0):
        for c in range(0, cols, k1):
            n = int(tissue[r:r + k0, c:c + k1].sum())
            if n:
                k = -(-n // batch)
                bounds = [round(i * n / k) for i in range(k + 1)]
                sizes += [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return sizes


def model_only(runner: BatchRunner, sizes: list[int], size: int) -> float:
    """tiles/s of the prepared encoder over ``sizes`` batches of random uint8 tiles in memory."""
    rng = np.random.default_rng(0)
    tiles = {n: torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)) for n in set(sizes)}
    runner.submit(tiles[max(sizes)]).result()  # warm-up (allocator, compile)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    t0 = time.perf_counter()
    for n in sizes:
        runner.submit(tiles[n]).result()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return sum(sizes) / (time.perf_counter() - t0)


class GpuSampler:
    """GPU utilisation (%) sampled by nvidia-smi every 200 ms while running; None without nvidia-smi."""

    def __init__(self, on: bool) -> None:
        self.samples: list[float] = []
        self._proc = None
        if on and shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           "-lms", "200"], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                continue

    def stop(self) -> dict | None:
        if self._proc is None:
            return None
        self._proc.terminate()
        self._proc.wait(timeout=5)
        s = self.samples
        return {"mean": round(statistics.fmean(s), 1), "median": statistics.median(s), "n": len(s)} if s else None


def bench(name: str, args: argparse.Namespace, slide: Path, work: Path) -> list[dict]:
    dev = resolve_device(args.device)
    t0 = time.perf_counter()
    loaded = load_encoder(name, random_weights=True, device="cpu")
    load_s = time.perf_counter() - t0
    spec = loaded.spec
    cfg = InferenceConfig(device=args.device, batch_size=args.batch_size, progress=False, precision=args.precision,
                          compile=args.compile, reader_threads=args.reader_threads, block_tiles=args.block_tiles)
    resolved = encoder_model(loaded)
    wrapper, _ = with_embeddings(resolved.module, spec.input_size, name)
    pre = TilePreprocessor(spec.input_size, spec.mean, spec.std, resolved.config.resize_interpolation)
    runner = BatchRunner(wrapper, pre, dev, args.batch_size, args.precision, compile=args.compile, n_probs=1)
    dtype = autocast_dtype(dev, args.precision)
    rows = []
    for rep in range(args.repeats):
        out = work / f"{name}-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        probe = None
        if rep == 0:  # the batch sizes come from the grid: one short run to learn them
            probe = embed_slide(slide, loaded, work / "probe", config=cfg)
            sizes = batch_sizes(HeatmapStore.open(probe.store), args.batch_size)
        before = model_only(runner, sizes, spec.input_size)
        gpu = GpuSampler(args.gpu_util)
        t1 = time.perf_counter()
        res = embed_slide(slide, loaded, out, config=cfg)
        e2e_s = time.perf_counter() - t1
        util = gpu.stop()
        after = model_only(runner, sizes, spec.input_size)
        mo = (before + after) / 2
        row = {"encoder": name, "repeat": rep, "device": str(dev), "cpu": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads(),
               "precision": str(dtype).replace("torch.", "") if dtype else "fp32",
               "compile": args.compile, "batch_size": args.batch_size, "input": spec.input_size, "dim": loaded.dim,
               "tissue_tiles": res.tiles_tissue, "batches": len(sizes), "e2e_s": round(e2e_s, 2),
               "e2e_tiles_s": round(res.tiles_tissue / e2e_s, 2), "model_only_tiles_s": round(mo, 2),
               "model_only_before_after": [round(before, 2), round(after, 2)],
               "ratio": round(res.tiles_tissue / e2e_s / mo, 3), "inference_stage_s": res.timings.get("inference"),
               "load_s": round(load_s, 2), "gpu_util": util, "slide": str(slide.name)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if probe is not None:
            shutil.rmtree(work / "probe", ignore_errors=True)
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({"encoder": name, "summary": True, "ratio_median": statistics.median(ratios),
                      "ratio_range": [min(ratios), max(ratios)],
                      "e2e_tiles_s_median": statistics.median(r["e2e_tiles_s"] for r in rows),
                      "model_only_tiles_s_median": statistics.median(r["model_only_tiles_s"] for r in rows)}),
              flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", nargs="+", default=["phikon"])
    ap.add_argument("--size", nargs=2, type=int, default=(6000, 6000), help="synthetic slide w h at 0.5 µm/px")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--compile", default="off")
    ap.add_argument("--reader-threads", type=int, default=2)
    ap.add_argument("--block-tiles", type=int, default=32)
    ap.add_argument("--gpu-util", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep the synthetic slide here between runs")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsi_enc_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    w, h = args.size
    slide = work / f"synthetic_{w}x{h}.tiff"
    if not slide.is_file():
        write_synthetic_slide(slide, w, h, 0.5, seed=7)
    print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                      "slide": f"{w}x{h} @ 0.5 µm/px"}), flush=True)
    for name in args.encoders:
        bench(name, args, slide, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
