"""Model-agnostic attributions (captum): Integrated Gradients and Occlusion.

Both only call ``model(x)``, so they work for CMAF-Net, timm models and TorchScript modules;
IG additionally needs autograd through the model (a frozen / inference-optimised TorchScript
module raises :class:`ExplainError`, use :func:`occlusion` there).
"""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import IntegratedGradients, Occlusion
from torch import nn

from wsi_cmaf.explain.common import ExplainError, Target, check_batch, eval_mode, resolve_target


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target = None, n_steps: int = 32,
                         baseline: float = 0.0, internal_batch_size: int | None = None) -> np.ndarray:
    """Integrated Gradients on the input, summed over channels -> signed (B, H, W) map.

    The baseline is a constant image (0 = the dataset mean after normalisation).
    """
    check_batch(x)
    with eval_mode(model):
        tgt = resolve_target(model, x, target)
        ig = IntegratedGradients(model)
        try:
            attr = ig.attribute(x, baselines=baseline, target=tgt, n_steps=n_steps,
                                internal_batch_size=internal_batch_size or x.shape[0] * n_steps)
        except RuntimeError as exc:  # no autograd graph (frozen TorchScript, inference mode)
            raise ExplainError(f"integrated gradients needs gradients through the model: {exc}") from exc
    return attr.sum(dim=1).detach().float().cpu().numpy()


def occlusion(model: nn.Module, x: torch.Tensor, target: Target = None, window: int | None = None,
              stride: int | None = None, baseline: float = 0.0) -> np.ndarray:
    """Drop in the target logit when a square window is replaced by ``baseline`` -> (B, H, W).

    Window defaults to 1/4 of the tile side and stride to half the window. No gradients needed.
    """
    check_batch(x)
    side = int(min(x.shape[-2:]))
    window = window or max(side // 4, 1)
    stride = stride or max(window // 2, 1)
    with eval_mode(model), torch.no_grad():
        tgt = resolve_target(model, x, target)
        attr = Occlusion(model).attribute(
            x, sliding_window_shapes=(x.shape[1], window, window), strides=(x.shape[1], stride, stride),
            baselines=baseline, target=tgt,
        )
    return attr.sum(dim=1).float().cpu().numpy()
