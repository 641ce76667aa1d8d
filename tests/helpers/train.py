"""Small training set-ups shared by the training tests: a tiny CMAF-Net run config and annotated
synthetic slides."""

from __future__ import annotations

from pathlib import Path

from wsi_cmaf.slide import write_synthetic_slide
from wsi_cmaf.train.config import merge_dicts
from wsi_cmaf.train.data.slide_patches import AnnotatedSlide

#: A CMAF-Net with the paper's structure and a tiny width (~0.4 M parameters).
TINY = dict(spatial_backbone="test_resnet", mvit_stem_channels=8, mvit_channels=[8, 16, 16, 16, 16],
            mvit_dims=[16, 16, 16], mvit_depths=[1, 1, 1], mvit_heads=2, context_dim=32, num_heads=2,
            bottleneck_dim=8, head_hidden=[16], nystrom_landmarks=16, attention="nystrom")


def tiny_config(out: Path, syn_dir: Path, **override) -> dict:
    """A three-stage run of :data:`TINY` on a small synthetic set, written to ``out``; ``override``
    is merged in (nested dicts key by key)."""
    base = {
        "data": {"synthetic": {"n_patients": 8, "patches_per_patient": 12, "ratio": "60:40", "signal": 1.0},
                 "synthetic_dir": str(syn_dir), "batch_size": 8, "eval_batch_size": 64,
                 "max_steps_per_epoch": 3},
        "model": {"kwargs": TINY, "input_size": 32},
        "stages": {"epochs": [1, 1, 1]},
        "output_dir": str(out), "bootstrap": 20, "log_every": 1, "progress_bar": False,
        # Compiling each tiny run would cost minutes on a GPU; compilation has its own tests
        # (tests/train/test_fast_paths.py).
        "compile": "off",
    }
    return merge_dicts(base, override)


def annotated_slides(root: Path, first_seed: int) -> list[AnnotatedSlide]:
    """Three 2 x 2 mm synthetic slides (8000² px at 0.25 µm/px) with their masks, one per split."""
    out = []
    for i, split in enumerate(("train", "val", "test")):
        s = write_synthetic_slide(root / f"slide{i}.tiff", 8000, 8000, 0.25, seed=first_seed + i)
        out.append(AnnotatedSlide(s.path, s.tumour_mask, s.mask_mpp, split))
    return out
