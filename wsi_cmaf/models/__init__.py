"""Models: CMAF-Net, a timm-like registry, patch-classifier configs and safetensors IO.

Each model module registers its own factories (``@register_model``); importing this package
imports every model module, so any ``wsi_cmaf.models`` import sees the full registry.

>>> from wsi_cmaf.models import create_model
>>> model = create_model("cmaf_net", num_classes=2)            # the paper's full model
>>> cnn = create_model("cmaf_net", ablation="cnn_only")         # a Table 6 ablation
>>> cheap = create_model("timm:resnet18", num_classes=2)        # any timm architecture
"""

from __future__ import annotations

from wsi_cmaf.models.cmaf_net import CMAFNet
from wsi_cmaf.models.config import ABLATIONS, TAU_INITS_TABLE7, CMAFConfig, ModelConfig, parse_tau_init
from wsi_cmaf.models.heads import TaskHeads, multitask_loss
from wsi_cmaf.models.io import load_model, read_config, save_model
from wsi_cmaf.models.multiview import MultiViewConfig, MultiViewNet
from wsi_cmaf.models.registry import create_model, is_model, list_models, register_model

__all__ = [
    "ABLATIONS",
    "TAU_INITS_TABLE7",
    "CMAFConfig",
    "CMAFNet",
    "ModelConfig",
    "MultiViewConfig",
    "MultiViewNet",
    "TaskHeads",
    "create_model",
    "is_model",
    "list_models",
    "load_model",
    "multitask_loss",
    "parse_tau_init",
    "read_config",
    "register_model",
    "save_model",
]
