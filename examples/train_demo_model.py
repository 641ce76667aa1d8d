"""Train the default model of ``wsi-cmaf demo`` / ``analyze_slide`` on synthetic slides.

    .venv/bin/python examples/train_demo_model.py            # ~10-15 min on 2 CPU cores

No labelled breast-cancer data exists on the project's machines, so the packaged default model
is trained on what the project can generate honestly: synthetic Aperio-style slides with a known
tumour mask (``wsi_cmaf.slide.synthetic``), cut into 50 px tiles at 4 µm/px by the same tiling
engine inference uses (``wsi_cmaf.train.data.slide_patches``), one patient per slide, whole slides
held out for validation and test. The demo slide itself (seed 7) is never used for training.

The model is a small-width CMAF-Net (the paper's architecture with fewer channels) at 64 px
input, trained with the paper's three stages and A-CBFL. It recognises the *synthetic* renderer's
tumour texture; it is not a diagnostic model, and its config.json says so. The exported weights
(safetensors + config.json) are copied into ``wsi_cmaf/models/weights/default``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi_cmaf.slide import load_synthetic_slide, write_synthetic_slide  # noqa: E402
from wsi_cmaf.train.config import TrainConfig  # noqa: E402
from wsi_cmaf.train.data.slide_patches import AnnotatedSlide, build_slide_patch_store  # noqa: E402
from wsi_cmaf.train.engine.trainer import train  # noqa: E402

DEFAULT_DIR = REPO / "wsi_cmaf" / "models" / "weights" / "default"
SPLITS = ["train"] * 9 + ["val"] * 2 + ["test"] * 2  # slide-level: 9 / 2 / 2 slides
SLIDE = {"width": 24_000, "height": 16_000, "mpp": 0.25}  # the demo slide's geometry
DEMO_SEED = 7

MODEL_KWARGS = {  # CMAFConfig overrides: the paper's blocks, small widths (fast on CPU)
    "spatial_backbone": "test_resnet",
    "mvit_stem_channels": 16,
    "mvit_channels": [16, 24, 32, 48, 64],
    "mvit_dims": [48, 64, 80],
    "mvit_depths": [1, 1, 1],
    "mvit_heads": 4,
    "context_dim": 96,
    "num_heads": 4,
    "bottleneck_dim": 32,
    "head_hidden": [64],
    "nystrom_landmarks": 16,
}


def make_slides(work: Path) -> list[AnnotatedSlide]:
    """Write (or reuse) the training slides; seeds 100.. never include the demo's seed 7."""
    items = []
    for i, split in enumerate(SPLITS):
        path = work / "slides" / f"train_slide_{i:02d}.tiff"
        slide = load_synthetic_slide(path)
        if slide is None:
            slide = write_synthetic_slide(path, SLIDE["width"], SLIDE["height"], SLIDE["mpp"], seed=100 + i)
        assert slide.seed != DEMO_SEED
        items.append(AnnotatedSlide(slide.path, slide.tumour_mask, slide.mask_mpp, split))
    return items


def config(store: Path, out: Path, epochs: tuple[int, int, int], seed: int) -> TrainConfig:
    """The run: paper stages (fewer epochs), A-CBFL + IB, SAM, small CMAF-Net at 64 px."""
    return TrainConfig.from_dict({
        "name": "demo-model",
        "output_dir": str(out),
        "seed": seed,
        "bootstrap": 500,
        "early_stopping_patience": 4,
        "data": {"source": str(store), "batch_size": 64, "eval_batch_size": 256},
        "model": {"name": "cmaf_net", "input_size": 64, "kwargs": MODEL_KWARGS},
        "loss": {"loss": "acbfl"},
        "stages": {"epochs": list(epochs)},
        "weights_note": (
            "trained by wsi-cmaf (examples/train_demo_model.py) on 50 px tiles at 4 um/px cut from "
            f"{SPLITS.count('train')} SYNTHETIC slides (wsi_cmaf.slide.synthetic); synthetic data only, "
            "not a diagnostic model"),
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "demo_model")
    ap.add_argument("--epochs", type=int, nargs=3, default=[6, 6, 4], help="epochs of the three stages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-install", action="store_true", help="do not copy the model into the package")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    items = make_slides(args.work)
    store = args.work / "patches.zarr"
    counts_path = args.work / "patch_counts.json"
    if not counts_path.is_file():
        counts = build_slide_patch_store(items, store)
        counts_path.write_text(json.dumps(counts, indent=2))
    counts = json.loads(counts_path.read_text())
    print("patches per split:", counts, flush=True)
    run_dir = args.work / f"run-seed{args.seed}"
    result = train(config(store, run_dir, tuple(args.epochs), args.seed), resume=run_dir.exists())
    metrics = result.test_metrics["metrics"]
    summary = {k: metrics[k] for k in ("balanced_accuracy", "sensitivity", "specificity", "auprc", "mcc")
               if k in metrics}
    print("held-out test slides:", json.dumps(summary, default=str), flush=True)
    if not args.no_install:
        if DEFAULT_DIR.exists():
            shutil.rmtree(DEFAULT_DIR)
        shutil.copytree(result.model_dir, DEFAULT_DIR)
        (DEFAULT_DIR / "TRAINING.json").write_text(json.dumps({
            "command": "python examples/train_demo_model.py " + " ".join(sys.argv[1:]),
            "patches": counts, "best_epoch": result.best_epoch, "test_metrics": summary,
            "train_seconds": round(result.seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        }, indent=2, default=str))
        print(f"installed the model into {DEFAULT_DIR}")


if __name__ == "__main__":
    main()
