"""Model-agnostic attributions (captum): Integrated Gradients and Occlusion, optionally smoothed.

Both only call ``model(x)``, so they work for CMAF-Net, timm models and TorchScript modules;
IG additionally needs autograd through the model (a frozen / inference-optimised TorchScript
module raises :class:`ExplainError`, use :func:`occlusion` there).

``nt_samples > 0`` wraps either method in captum's ``NoiseTunnel``: the map is averaged over
that many copies of the input with Gaussian noise added (SmoothGrad, Smilkov et al. 2017;
``nt_type`` "smoothgrad_sq" / "vargrad" give its squared / variance variants). The noise's
standard deviation ``nt_stdev`` is a fraction of the batch's input range, the paper's convention
(10-20 % works best there), so it means the same for any input normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import Attribution, IntegratedGradients, NoiseTunnel, Occlusion
from torch import nn

from wsi_cmaf.explain.common import ExplainError, Target, check_batch, eval_mode, resolve_target

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _check_noise(nt_samples: int, nt_stdev: float, nt_type: str) -> None:
    if nt_samples < 0 or nt_stdev < 0 or nt_type not in NT_TYPES:
        raise ExplainError(f"noise tunnel needs nt_samples >= 0, nt_stdev >= 0 and nt_type in {NT_TYPES}; "
                           f"got {nt_samples}, {nt_stdev}, {nt_type!r}")


def _attribute(method: Attribution, x: torch.Tensor, nt_samples: int, nt_stdev: float, nt_type: str,
               **kwargs) -> torch.Tensor:
    """``method.attribute(x, **kwargs)``, through a NoiseTunnel when ``nt_samples`` > 0."""
    if nt_samples <= 0:
        return method.attribute(x, **kwargs)
    stdev = float(nt_stdev) * float((x.amax() - x.amin()).item())
    # draw_baseline_from_distrib=False: the baselines stay the caller's constant image
    return NoiseTunnel(method).attribute(x, nt_type=nt_type, nt_samples=int(nt_samples),
                                         nt_samples_batch_size=int(nt_samples), stdevs=stdev, **kwargs)


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target = None, n_steps: int = 32,
                         baseline: float = 0.0, internal_batch_size: int | None = None, *,
                         nt_samples: int = 0, nt_stdev: float = 0.15,
                         nt_type: str = "smoothgrad", forward_args: tuple = ()) -> np.ndarray:
    """Integrated Gradients on the input, summed over channels -> signed (B, H, W) map.

    The baseline is a constant image (0 = the dataset mean after normalisation). With
    ``nt_samples`` > 0 the map is the NoiseTunnel (SmoothGrad) average over noisy copies.
    ``forward_args``: more inputs of ``model`` (one row per sample), held fixed and not attributed.
    """
    check_batch(x)
    _check_noise(nt_samples, nt_stdev, nt_type)
    with eval_mode(model):
        tgt = resolve_target(model, x, target)
        ig = IntegratedGradients(model)
        try:
            attr = _attribute(ig, x, nt_samples, nt_stdev, nt_type, baselines=baseline, target=tgt,
                              n_steps=n_steps, internal_batch_size=internal_batch_size or x.shape[0] * n_steps,
                              additional_forward_args=tuple(forward_args) or None)
        except RuntimeError as exc:  # no autograd graph (frozen TorchScript, inference mode)
            raise ExplainError(f"integrated gradients needs gradients through the model: {exc}") from exc
    return attr.sum(dim=1).detach().float().cpu().numpy()


def occlusion(model: nn.Module, x: torch.Tensor, target: Target = None, window: int | None = None,
              stride: int | None = None, baseline: float = 0.0, *, nt_samples: int = 0,
              nt_stdev: float = 0.15, nt_type: str = "smoothgrad", forward_args: tuple = ()) -> np.ndarray:
    """Drop in the target logit when a square window is replaced by ``baseline`` -> (B, H, W).

    Window defaults to 1/4 of the tile side and stride to half the window. No gradients needed.
    With ``nt_samples`` > 0 the map is the NoiseTunnel average over noisy copies of the input.
    ``forward_args``: more inputs of ``model`` (one row per sample), held fixed and not occluded.
    """
    check_batch(x)
    _check_noise(nt_samples, nt_stdev, nt_type)
    side = int(min(x.shape[-2:]))
    window = window or max(side // 4, 1)
    stride = stride or max(window // 2, 1)
    with eval_mode(model), torch.no_grad():
        tgt = resolve_target(model, x, target)
        attr = _attribute(Occlusion(model), x, nt_samples, nt_stdev, nt_type,
                          sliding_window_shapes=(x.shape[1], window, window),
                          strides=(x.shape[1], stride, stride), baselines=baseline, target=tgt,
                          additional_forward_args=tuple(forward_args) or None)
    return attr.sum(dim=1).float().cpu().numpy()
