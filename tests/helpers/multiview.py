"""The 2-view test model (50 px at 4 µm/px + 50 px of context at 16 µm/px) and the views of chosen
tiles read by hand, shared by the multi-view test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsi_cmaf.models import ModelConfig, create_model, save_model
from wsi_cmaf.models.multiview import MultiViewNet
from wsi_cmaf.preprocess import TilePreprocessor, ViewsPreprocessor, pack_views
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reader import open_slide
from wsi_cmaf.slide.tissue import TissueMask
from wsi_cmaf.slide.views import BlockViews, ViewSpec, read_block_views

VIEWS = [{"mpp": 4.0, "size": 50}, {"mpp": 16.0, "size": 50}]
MODEL_CFG = ModelConfig(architecture="multiview", num_classes=2, class_names=["benign", "malignant"], input_size=32,
                        stain_normalization=None, weights_note="test model (random weights, seed 0)")


def multiview_model() -> MultiViewNet:
    """The 2-view model on ``timm:test_resnet``, seed 0, its head scaled so that tiles (and their
    context) give clearly different outputs (random init gives probabilities near 0.5)."""
    torch.manual_seed(0)
    model = create_model("multiview", num_classes=2, backbone="timm:test_resnet", num_views=2, views=VIEWS).eval()
    with torch.no_grad():
        model.heads.heads["malignancy"].weight.mul_(20.0)
    return model


def saved_multiview_model(out: Path) -> tuple[Path, MultiViewNet]:
    """:func:`multiview_model` saved to ``out`` with :data:`MODEL_CFG`: (folder, model)."""
    model = multiview_model()
    return save_model(model, MODEL_CFG, out), model


def views_by_hand(slide_path: Path, store, rows: np.ndarray, cols: np.ndarray
                  ) -> tuple[list[torch.Tensor], torch.Tensor, BlockViews]:
    """Views of tiles (rows, cols) of a store's 50 px @ 4 µm/px grid, read and preprocessed as the
    engine does: (views, missing mask, the raw BlockViews)."""
    mask, mpp = store.tissue_mask()
    with open_slide(slide_path) as reader:
        grid = TileGrid.from_slide(reader, GridConfig(mpp=4.0, tile_size=50), TissueMask(mask, mpp))
        item = read_block_views(reader, grid, None, [ViewSpec(v["mpp"], v["size"]) for v in VIEWS],
                                rows=np.asarray(rows, np.int64), cols=np.asarray(cols, np.int64))
    pre = ViewsPreprocessor(TilePreprocessor(32, tuple(MODEL_CFG.mean), tuple(MODEL_CFG.std), "bicubic"), [50, 50])
    views, missing = pre(torch.from_numpy(pack_views(item)))
    return views, missing, item
