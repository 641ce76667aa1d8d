"""Synthetic patients for the slide-level and clinical-fusion evidence.

Two sources of tile embeddings, both from the real inference engine:

* :func:`write_patient_slides`: small synthetic slides (:mod:`wsi_cmaf.slide.synthetic`) run
  through ``analyze_slide(..., embeddings=True)`` with :class:`TinyTileEncoder`; the slide label
  is whether its tumour burden (share of tissue tiles on the ground-truth tumour mask) passes a
  threshold. Used by the end-to-end test and the CLI example.
* :func:`tile_bank` + :func:`make_cohort`: for experiments over hundreds of patients and paired
  seeds, the engine embeds a few larger synthetic slides once; each tile is marked tumour/normal
  from the ground-truth mask; a patient's bag is then drawn from this bank with a tumour burden
  that depends on the label. Clinical variables are drawn given the label at a set strength.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from wsi_cmaf.models import ModelConfig

logger = logging.getLogger(__name__)


class TinyTileEncoder(nn.Module):
    """A fixed, seeded, untrained 3-layer CNN: ``forward_features`` gives its last map,
    ``forward_head(..., pre_logits=True)`` that map's per-channel mean and std (D = 2 * width) and
    ``forward_head`` a linear layer on them. Cheap enough to embed slides on 2 CPU cores;
    random conv features still separate the denser, darker synthetic tumour texture."""

    def __init__(self, width: int = 16, num_classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, width, 3, stride=2, padding=1),
                                    nn.Conv2d(width, width, 3, stride=2, padding=1),
                                    nn.Conv2d(width, width, 3, stride=1, padding=1)])
        self.num_features = 2 * width
        self.fc = nn.Linear(2 * width, num_classes)
        with torch.no_grad():
            for p in self.parameters():  # own generator: the weights do not depend on global RNG state
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.05))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last map (B, width, H/4, W/4)."""
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map -> logits, or the pooled (B, 2 * width) embedding with ``pre_logits``."""
        pooled = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def encoder_config() -> ModelConfig:
    """Geometry of :class:`TinyTileEncoder`: 50 px tiles at 4 µm/px, 32 px input, no stain step."""
    return ModelConfig(architecture="tiny_tile_encoder", num_classes=2, class_names=["normal", "tumour"],
                       input_size=32, stain_normalization=None,
                       weights_note="fixed random encoder for synthetic experiments (seed 0)")


def _embed_slide(slide_path: Path, out: Path, encoder: nn.Module, batch_size: int = 128):
    from wsi_cmaf.infer import InferenceConfig, analyze_slide

    cfg = InferenceConfig(block_tiles=8, progress=False, batch_size=batch_size, overlay=False, geojson=False,
                          embeddings=True, compile="off", precision="off")
    return analyze_slide(slide_path, model=encoder, model_config=encoder_config(), out=out, config=cfg)


def _tumour_per_tile(store_path: Path, tumour_mask: np.ndarray,
                     mask_mpp: float) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Tiles, embeddings and, per tile, whether its centre lies on the ground-truth tumour mask."""
    from wsi_cmaf.slidelevel.bags import read_embeddings

    tiles, x = read_embeddings(store_path)
    iy = np.clip((tiles["y_um"].to_numpy() / mask_mpp).astype(int), 0, tumour_mask.shape[0] - 1)
    ix = np.clip((tiles["x_um"].to_numpy() / mask_mpp).astype(int), 0, tumour_mask.shape[1] - 1)
    return tiles, x, tumour_mask[iy, ix]


def write_patient_slides(root: str | Path, n: int, *, seed: int = 0, size: tuple[int, int] = (3200, 2400),
                         burden_threshold: float = 0.1) -> pd.DataFrame:
    """Write ``n`` small synthetic slides, embed them with the engine, and return a manifest.

    Rows: ``store, label, patient, burden``; odd patients get tumour-free slides, even ones
    slides with tumour; ``label = burden > burden_threshold`` (burden: share of the slide's tissue
    tiles whose centre lies on the ground-truth tumour mask).
    """
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    root = Path(root)
    encoder = TinyTileEncoder()
    rows = []
    for i in range(n):
        s = write_synthetic_slide(root / "slides" / f"p{i:03d}.tiff", size[0], size[1], 0.5, seed=seed + i,
                                  tumour=i % 2 == 0)
        res = _embed_slide(s.path, root / "out" / f"p{i:03d}", encoder)
        _, _, tumour = _tumour_per_tile(res.store, s.tumour_mask, s.mask_mpp)
        burden = float(tumour.mean()) if len(tumour) else 0.0
        rows.append({"store": str(res.store), "label": int(burden > burden_threshold),
                     "patient": f"P{i:03d}", "burden": burden})
    return pd.DataFrame(rows)


@dataclass
class TileBank:
    """Tile embeddings of the bank slides, split by ground truth."""

    normal: np.ndarray
    tumour: np.ndarray


def tile_bank(root: str | Path, *, n_slides: int = 3, size: tuple[int, int] = (9600, 7200),
              seed: int = 100) -> TileBank:
    """Embed ``n_slides`` synthetic slides with tumour (engine + :class:`TinyTileEncoder`) once and
    split their tissue tiles into tumour / normal by the ground-truth mask (cached on disk)."""
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    root = Path(root)
    cache = root / "tile_bank.npz"
    if cache.is_file():
        z = np.load(cache)
        return TileBank(z["normal"], z["tumour"])
    encoder = TinyTileEncoder()
    normal, tumour = [], []
    for i in range(n_slides):
        s = write_synthetic_slide(root / "bank" / f"b{i}.tiff", size[0], size[1], 0.5, seed=seed + i, tumour=True)
        res = _embed_slide(s.path, root / "bank_out" / f"b{i}", encoder)
        _, x, is_tumour = _tumour_per_tile(res.store, s.tumour_mask, s.mask_mpp)
        normal.append(x[~is_tumour])
        tumour.append(x[is_tumour])
    bank = TileBank(np.concatenate(normal), np.concatenate(tumour))
    np.savez_compressed(cache, normal=bank.normal, tumour=bank.tumour)
    logger.info("tile bank: %d normal, %d tumour tiles", len(bank.normal), len(bank.tumour))
    return bank


def clinical_schema_dict() -> dict:
    """The declared schema of the synthetic clinical table."""
    return {"variables": [
        {"name": "grade", "type": "categorical", "categories": ["1", "2", "3"]},
        {"name": "er_status", "type": "categorical", "categories": ["neg", "pos"]},
        {"name": "age", "type": "continuous"},
        {"name": "tumour_size_mm", "type": "continuous"},
    ]}


@dataclass
class Cohort:
    """Bags, labels and the clinical table of one synthetic cohort."""

    bags: list[np.ndarray]
    labels: np.ndarray
    clinical: pd.DataFrame
    burden: np.ndarray


def make_cohort(bank: TileBank, n: int, *, seed: int, image_strength: float = 0.10,
                clinical_strength: float = 1.0, tiles: tuple[int, int] = (40, 120)) -> Cohort:
    """``n`` patients, label ~ Bernoulli(0.5).

    Image: tumour burden ~ Beta with mean 0.05 (label 0) or 0.05 + ``image_strength`` (label 1);
    the bag holds that share of tumour tiles. Clinical, independent of the image given the label:
    ``tumour_size_mm`` ~ N(20 + 8 * s * y, 8); ``grade`` leans to 3 for y = 1 (strength s);
    ``er_status`` and ``age`` carry no signal (noise variables the model must ignore).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    mean = 0.05 + image_strength * y
    k = 20.0  # Beta concentration: burden spread around its mean
    burden = rng.beta(mean * k, (1 - mean) * k)
    bags = []
    for b in burden:
        m = int(rng.integers(tiles[0], tiles[1] + 1))
        n_t = int(rng.binomial(m, b))
        bag = np.concatenate([bank.tumour[rng.integers(0, len(bank.tumour), n_t)],
                              bank.normal[rng.integers(0, len(bank.normal), m - n_t)]])
        bags.append(bag[rng.permutation(m)].astype(np.float32))
    s = clinical_strength
    logits = np.stack([np.zeros(n), 0.5 * s * y, 1.0 * s * y], 1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    grade = np.array([rng.choice(["1", "2", "3"], p=pi) for pi in p])
    clinical = pd.DataFrame({
        "patient": [f"P{i:04d}" for i in range(n)],
        "grade": grade,
        "er_status": rng.choice(["neg", "pos"], n, p=[0.3, 0.7]),
        "age": rng.normal(60, 10, n).round(0),
        "tumour_size_mm": rng.normal(20 + 8 * s * y, 8),
    })
    return Cohort(bags, y.astype(np.int64), clinical, burden)
