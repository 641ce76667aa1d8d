"""wsi-cmaf vs a WSInfer-style reference loop on a WSInfer model-zoo folder (issue 18).

Both run the same TorchScript ResNet-18 (timm, 2 classes, random weights: speed and agreement
only) from a folder in WSInfer's layout (``config.json`` + ``torchscript_model.pt``) on a
synthetic Aperio-style slide at 1 µm/px, patches of 50 px at 4 µm/px (200 px level-0 regions):

* **wsi-cmaf**: ``analyze_slide(slide, model=folder)`` end to end (tissue mask, grid, level-0
  block reads, on-device resize, model, store), overlay/GeoJSON off, batch 64.
* **reference**: WSInfer 0.6's per-patch pipeline on the same tissue patches: tiffslide
  ``read_region`` at level 0 -> ``convert("RGB")`` -> torchvision Resize/ToTensor/Normalize ->
  model in batches of 64 -> softmax, single process (WSInfer's ``num_workers=0``). It does not
  include WSInfer's tissue segmentation and patching, which favours the reference.

This loop does not need WSInfer installed; ``bench_wsinfer_real.py`` runs the real wsinfer 0.6.1 CLI
from its own venv (it needs ``zarr<3``, ``tiffslide<2.5`` and ``tifffile<2025``, which would downgrade
this venv's packages) on the same folders made by :func:`make_zoo_folder`. Torch runs with
``--threads`` threads in both.

    .venv/bin/python benchmarks/bench_wsinfer.py --size 20000 --input-sizes 64
    .venv/bin/python benchmarks/bench_wsinfer.py --size 8000 --input-sizes 224
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_zoo_folder(root: Path, input_size: int, patch_px: int = 50, spacing_um_px: float = 4.0) -> Path:
    """A WSInfer model-zoo folder with a traced timm ResNet-18 at ``input_size`` px, for patches of
    ``patch_px`` px at ``spacing_um_px`` µm/px."""
    import timm

    geometry = "" if (patch_px, spacing_um_px) == (50, 4.0) else f"_{patch_px}px_{spacing_um_px:g}um"
    folder = root / f"resnet18_{input_size}{geometry}"
    if (folder / "torchscript_model.pt").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    with torch.inference_mode():
        traced = torch.jit.trace(net, torch.zeros(1, 3, input_size, input_size))
    traced.save(str(folder / "torchscript_model.pt"))
    config = {"spec_version": "1.0", "architecture": "resnet18", "num_classes": 2,
              "class_names": ["notumor", "tumor"], "patch_size_pixels": patch_px, "spacing_um_px": spacing_um_px,
              "transform": [{"name": "Resize", "arguments": {"size": input_size}}, {"name": "ToTensor"},
                            {"name": "Normalize", "arguments": {"mean": MEAN, "std": STD}}]}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def run_wsi_cmaf(slide: Path, folder: Path, out: Path, batch_size: int, threads: int):
    from wsi_cmaf.infer.config import InferenceConfig
    from wsi_cmaf.infer.pipeline import analyze_slide

    cfg = InferenceConfig(batch_size=batch_size, overlay=False, geojson=False, progress=False,
                          reader_threads=threads, device="cpu")
    t0 = time.perf_counter()
    result = analyze_slide(slide, model=folder, out=out, config=cfg, overwrite=True)
    return time.perf_counter() - t0, result


def run_reference(slide: Path, folder: Path, coords: np.ndarray, size0: int,
                  batch_size: int) -> tuple[float, np.ndarray]:
    """WSInfer 0.6's per-patch loop (see the module docstring); returns (seconds, probabilities)."""
    import tiffslide
    from torchvision import transforms

    t0 = time.perf_counter()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    size = config["transform"][0]["arguments"]["size"]
    tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    model = torch.jit.load(str(folder / "torchscript_model.pt"), map_location="cpu").eval()
    ts = tiffslide.TiffSlide(str(slide))
    probs = []
    with torch.inference_mode():
        for start in range(0, len(coords), batch_size):
            batch = torch.stack([tf(ts.read_region((int(x), int(y)), 0, (size0, size0)).convert("RGB"))
                                 for x, y in coords[start:start + batch_size]])
            probs.append(torch.softmax(model(batch), dim=1).numpy())
    ts.close()
    return time.perf_counter() - t0, np.concatenate(probs)


def model_only_per_s(folder: Path, input_size: int, batch_size: int, batches: int = 5) -> float:
    """Images/s of the TorchScript model alone (random input, after 2 warm-up batches): the bound."""
    model = torch.jit.load(str(folder / "torchscript_model.pt"), map_location="cpu").eval()
    x = torch.randn(batch_size, 3, input_size, input_size)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
    return batches * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="synthetic slide side (level-0 px)")
    ap.add_argument("--mpp", type=float, default=1.0, help="slide µm/px (1.0: 200 px regions)")
    ap.add_argument("--input-sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved (wsi-cmaf, reference) pairs")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_cmaf_bench_wsinfer")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.workdir / f"synthetic_{args.size}_{args.mpp:g}.tiff"
    if not slide.is_file():
        t0 = time.perf_counter()
        write_synthetic_slide(slide, args.size, args.size, args.mpp, seed=0, workers=args.threads)
        print(f"wrote {slide} in {time.perf_counter() - t0:.1f} s")
    size0 = round(50 * 4.0 / args.mpp)
    report = []
    for input_size in args.input_sizes:
        folder = make_zoo_folder(args.workdir, input_size)
        ours_s, ref_s = [], []
        for _ in range(args.repeats):
            t, result = run_wsi_cmaf(slide, folder, args.workdir / f"out_{input_size}", args.batch_size, args.threads)
            ours_s.append(t)
            tiles = result.tiles()
            coords = tiles[["x", "y"]].to_numpy()
            t, ref_probs = run_reference(slide, folder, coords, size0, args.batch_size)
            ref_s.append(t)
        ours_probs = tiles[["prob_notumor", "prob_tumor"]].to_numpy()
        diff = np.abs(ours_probs - ref_probs)
        row = {"input_px": input_size, "patches": int(len(coords)), "wsi_cmaf_s": [round(v, 2) for v in ours_s],
               "reference_s": [round(v, 2) for v in ref_s],
               "speedup_best": round(min(ref_s) / min(ours_s), 2),
               "wsi_cmaf_patches_per_s": round(len(coords) / min(ours_s), 1),
               "reference_patches_per_s": round(len(coords) / min(ref_s), 1),
               "model_only_patches_per_s": round(model_only_per_s(folder, input_size, args.batch_size), 1),
               "prob_max_abs_diff": round(float(diff.max()), 5), "prob_mean_abs_diff": round(float(diff.mean()), 6),
               "timings": result.timings}
        print(json.dumps(row))
        report.append(row)
    print(json.dumps({"slide": str(slide), "size": args.size, "mpp": args.mpp, "threads": args.threads,
                      "batch_size": args.batch_size, "results": report}, indent=1))


if __name__ == "__main__":
    main()
