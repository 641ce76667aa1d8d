"""Pointing game + Adebayo et al. (2018) data-randomisation check for wsi_cmaf.explain.

Trains a small model on planted-texture tiles (wsi_cmaf.explain.planted), then scores the
saliency maps of held-out malignant tiles: the fraction of |saliency| inside the planted
region (mass) and how often the argmax lies inside it (hit), against uniform-noise maps.
The same model trained on shuffled labels must NOT beat the baseline.

    .venv/bin/python benchmarks/explain_sanity.py                 # tiny CNN, ~30 s on 2 CPU cores
    .venv/bin/python benchmarks/explain_sanity.py --model cmaf    # tiny CMAF-Net, all maps (slow on CPU)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from wsi_cmaf.explain import (
    cross_attention_maps,
    gate_map,
    gradcam_contextual,
    gradcam_spatial,
    integrated_gradients,
    occlusion,
    pointing_score,
    random_baseline,
)
from wsi_cmaf.explain.planted import planted_tiles, train_quick

TINY_CMAF = dict(spatial_backbone="test_resnet", mvit_stem_channels=8, mvit_channels=[8, 16, 16, 16, 16],
                 mvit_dims=[16, 16, 16], mvit_depths=[1, 1, 1], mvit_heads=2, context_dim=32, num_heads=2,
                 bottleneck_dim=8, head_hidden=[16], nystrom_landmarks=16)


def tiny_cnn() -> nn.Module:
    """Three convs and global max pooling: enough to detect a local texture anywhere."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 2, 3, padding=1), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
    )


def build(kind: str, size: int) -> nn.Module:
    """A fresh model of ``kind`` ('cnn' or 'cmaf')."""
    if kind == "cnn":
        return tiny_cnn()
    from wsi_cmaf.models import create_model
    return create_model("cmaf_net", num_classes=2, input_size=size, **TINY_CMAF)


def methods(kind: str) -> dict[str, Callable[[nn.Module, torch.Tensor], np.ndarray]]:
    """Map name -> function(model, x) giving (B, H, W) maps for the malignant class."""
    out: dict[str, Callable[[nn.Module, torch.Tensor], np.ndarray]] = {
        "integrated_gradients": lambda m, x: integrated_gradients(m, x, 1, n_steps=16),
        "occlusion": lambda m, x: occlusion(m, x, 1),
    }
    if kind == "cmaf":
        out.update({
            "gradcam_spatial": lambda m, x: gradcam_spatial(m, x, 1),
            "gradcam_contextual": lambda m, x: gradcam_contextual(m, x, 1),
            "attention_received": lambda m, x: cross_attention_maps(m, x).received.mean(axis=1),
            "gate": gate_map,
        })
    return out


def run(kind: str = "cnn", size: int = 32, region: int = 12, n_train: int = 512, n_test: int = 64,
        steps: int = 120, seed: int = 0) -> dict:
    """Train a real and a shuffled-label model; return pointing scores per method plus the baseline."""
    torch.manual_seed(seed)
    train, test = planted_tiles(n_train, size, region, seed=seed), planted_tiles(n_test, size, region, seed=seed + 1)
    pos = (test.y == 1).numpy()
    x, masks = test.x[torch.from_numpy(pos)], test.mask[pos]
    base = random_baseline(masks)
    result: dict = {"model": kind, "size": size, "region": region, "steps": steps, "seed": seed,
                    "random": vars(base), "runs": {}}
    for label_mode in ("true", "shuffled"):
        torch.manual_seed(seed)
        model = build(kind, size)
        t0 = time.perf_counter()
        acc = train_quick(model, train, steps=steps, shuffle_labels=label_mode == "shuffled", seed=seed)
        with torch.no_grad():
            test_acc = float((model(test.x).argmax(1) == test.y).float().mean())
        scores = {name: vars(pointing_score(fn(model, x), masks)) for name, fn in methods(kind).items()}
        result["runs"][label_mode] = {"train_acc": acc, "test_acc": test_acc,
                                      "train_s": round(time.perf_counter() - t0, 1), "scores": scores}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("cnn", "cmaf"), default="cnn")
    ap.add_argument("--size", type=int, default=None, help="tile side (default 32 cnn, 64 cmaf)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    size = args.size or (32 if args.model == "cnn" else 64)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    res = run(args.model, size=size, region=size * 3 // 8, steps=args.steps, seed=args.seed)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
