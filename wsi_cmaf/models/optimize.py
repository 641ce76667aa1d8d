"""Inference-time preparation of any patch classifier: BN folding, channels_last, torch.compile.

:func:`prepare_for_inference` is generic (CMAF-Net, timm models, TorchScript) and computes the
same function as the model it is given; it works on a deep copy, so the caller's model (and the
weights file it came from) are never touched. Used by the inference loop and by Table 8, so
every model in a comparison is prepared the same way.

BatchNorm folding walks the module tree instead of tracing it with ``torch.fx``: CMAF-Net's
forward has data-dependent Python control flow (odd grid sizes, Nyström vs exact attention)
that symbolic tracing cannot follow. Only (conv, BN) pairs whose forward order is known are
folded: consecutive children of ``nn.Sequential`` (and timm's ``FeatureListNet``, which runs its
children in order) and the named pairs of timm's building blocks listed in :data:`_NAMED_PAIRS`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, TypeGuard, cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from wsi_cmaf.device import cpu_has_native_bf16

logger = logging.getLogger(__name__)

#: Valid values of the ``compile`` setting (inference and training configs validate against it).
COMPILE_MODES = ("auto", "off", "on", "default", "max-autotune", "reduce-overhead")
#: ``compile="auto"`` with ``cuda_graph_batch`` at most this uses CUDA graphs: at small batches
#: the launch overhead of ~1k kernels dominates, at large ones compiled kernels matter more.
CUDA_GRAPH_MAX_BATCH = 16

# Class name -> (conv attribute, BN attribute) pairs that the class's forward applies back to back.
_NAMED_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "ConvNormAct": (("conv", "bn"),),
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "ResNet": (("conv1", "bn1"),),
    "InvertedResidual": (("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "DepthwiseSeparableConv": (("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
    "EfficientNetFeatures": (("conv_stem", "bn1"),),
}
# Containers whose forward runs the children in registration order.
_SEQUENTIAL_CLASSES = ("Sequential", "FeatureListNet")


def _foldable_conv(m: object) -> TypeGuard[nn.Conv2d]:
    # Plain convolutions only (timm's Conv2dSame only pads first): weight-standardising or
    # otherwise re-parameterised convs (StdConv2d, ScaledStdConv2d) would fold wrongly.
    return m is not None and type(m).__name__ in ("Conv2d", "Conv2dSame") and isinstance(m, nn.Conv2d)


def _foldable_bn(m: object) -> TypeGuard[nn.BatchNorm2d]:
    # timm's BatchNormAct2d subclasses BatchNorm2d; other subclasses (SyncBatchNorm...) are left alone
    if not isinstance(m, nn.BatchNorm2d) or type(m).__name__ not in ("BatchNorm2d", "BatchNormAct2d"):
        return False
    return bool(m.track_running_stats and m.running_mean is not None and m.running_var is not None)


def _after_bn(bn: nn.Module) -> nn.Module:
    """What stays of a BN once folded: nothing, or timm BatchNormAct2d's drop + activation."""
    if type(bn).__name__ == "BatchNormAct2d":
        return nn.Sequential(bn.get_submodule("drop"), bn.get_submodule("act"))
    return nn.Identity()


def _fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> bool:
    conv_owner, conv = parent, getattr(parent, conv_name, None)
    # A deep stem (timm ResNet "d" variants) is a Sequential whose last conv feeds the BN.
    while isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[-1], nn.Module):
        conv_owner, conv_name = conv, list(conv._modules)[-1]
        conv = conv_owner._modules[conv_name]
    bn = getattr(parent, bn_name, None)
    if not (_foldable_conv(conv) and _foldable_bn(bn)) or conv.out_channels != bn.num_features:
        return False
    setattr(conv_owner, conv_name, fuse_conv_bn_eval(conv, bn))
    setattr(parent, bn_name, _after_bn(bn))
    return True


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every recognised (Conv2d -> BatchNorm2d) pair of an eval-mode model in place.

    Returns the number of BatchNorms folded. The model must be in eval mode (running statistics
    are what gets folded); training-mode models are refused.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (running stats are folded)")
    folded = 0
    for parent in list(model.modules()):
        kind = type(parent).__name__
        if kind in _SEQUENTIAL_CLASSES:
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                folded += _fold_pair(parent, a, b)
        for conv_name, bn_name in _NAMED_PAIRS.get(kind, ()):
            folded += _fold_pair(parent, conv_name, bn_name)
    return folded


def resolve_compile_mode(compile: str, device: torch.device, cuda_graph_batch: int | None = None) -> str | None:
    """The ``torch.compile`` mode a ``compile`` setting means on ``device`` (None = eager)."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    if compile == "off":
        return None
    if compile == "auto":
        if device.type != "cuda":  # CPU Inductor compiles for minutes and gains little
            return None
        small = cuda_graph_batch is not None and cuda_graph_batch <= CUDA_GRAPH_MAX_BATCH
        return "reduce-overhead" if small else "default"
    return "default" if compile == "on" else compile


class _CudaGraphModule(nn.Module):
    """Runs a ``reduce-overhead`` compiled model and hands out outputs the next replay cannot overwrite.

    A CUDA-graph replay writes into the same static output buffers every time; callers that keep a
    batch's logits while running the next batch would read overwritten values. The clone costs one
    small copy of the logits.
    """

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: object, **kwargs: object) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(*args, **kwargs)
        return out.clone() if isinstance(out, torch.Tensor) else out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # config, num_classes...: the compiled wrapper forwards them to the original model
            return getattr(self._modules["compiled"], name)


def _autocasts_by_default(device: torch.device) -> bool:
    """Whether ``precision="auto"`` runs ``device`` in reduced precision (CUDA, CPUs with native bf16)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_has_native_bf16()


def _optimize_torchscript(model: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    """An eval-mode copy of a TorchScript model on ``device``, frozen for inference.

    ``torch.jit.freeze`` inlines the weights as constants and folds BatchNorms into convolutions;
    ``optimize_for_inference`` then pre-packs the convolutions into fp32 oneDNN kernels, which
    ``torch.autocast`` no longer reaches. So it is applied only where the default precision is
    fp32; where ``auto`` autocasts (CUDA, native-bf16 CPUs) the model is frozen only, so its
    convolutions still run in bf16. Measured on a traced ResNet-18, batch 64, 2 CPU threads with
    AMX (img/s, medians of interleaved runs on a shared machine, 64 px / 224 px): plain fp32
    447 / 41, frozen fp32 464 / 45, frozen + optimised fp32 715 / 60, frozen bf16 559 / 75,
    frozen + optimised under bf16 autocast 721 / 62 (at 64 px the bf16 rows swap places from run
    to run; at 224 px, where the model dominates, frozen bf16 leads). Outputs stay within 1e-5 of
    the module as loaded (``tests/infer/test_cpu_precision.py``). A module that cannot be frozen (e.g.
    one already frozen) runs as it is. The caller's module is never modified.
    """
    moved = model.to(device).eval()
    try:
        frozen = torch.jit.freeze(moved)  # a new module; ``moved`` stays as it is
    except (RuntimeError, AttributeError) as exc:
        logger.info("TorchScript %s runs unfrozen: freezing failed (%s)", type(model).__name__, exc)
        return moved
    if _autocasts_by_default(device):
        logger.info("prepared TorchScript model for inference on %s: frozen (autocast stays effective)", device)
        return _eval_flag(frozen)
    try:
        with warnings.catch_warnings():
            # deprecated in favour of torch.compile, which does not take a ScriptModule and
            # compiles for minutes on CPU: for TorchScript this is the path that fits
            warnings.simplefilter("ignore", FutureWarning)
            optimized = torch.jit.optimize_for_inference(frozen)
    except RuntimeError as exc:  # an op the oneDNN rewrite does not know: frozen alone still helps
        logger.info("TorchScript model runs frozen without optimize_for_inference (%s)", exc)
        return _eval_flag(torch.jit.freeze(moved))  # optimize_for_inference rewrites in place: start again
    logger.info("prepared TorchScript model for inference on %s: frozen + optimize_for_inference", device)
    return _eval_flag(optimized)


def _eval_flag(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Give a frozen module back its ``training = False``.

    Freezing drops the attribute, yet callers read it like any module's (and ``.eval()`` sets it).
    Set only after ``optimize_for_inference``, which takes a module with the attribute as unfrozen.
    """
    module.training = False
    return module


def prepare_for_inference(
    model: nn.Module,
    device: torch.device | str,
    *,
    compile: str = "auto",
    channels_last: bool = True,
    cuda_graph_batch: int | None = None,
    inplace: bool = False,
) -> nn.Module:
    """An eval-mode copy of ``model`` on ``device`` computing the same function, faster.

    * BatchNorm folded into the preceding convolutions (see :func:`fold_batchnorm`).
    * ``channels_last`` weights for models with 2-D convolutions (inputs may stay NCHW).
    * ``compile``: ``"auto"`` = ``torch.compile`` on CUDA (CUDA graphs when ``cuda_graph_batch``
      is at most :data:`CUDA_GRAPH_MAX_BATCH`), eager on CPU; ``"off"`` = eager;
      ``"on"``/``"default"``/``"max-autotune"`` = compile with that mode;
      ``"reduce-overhead"`` = CUDA graphs (small fixed batches). Shapes are specialised
      (``dynamic=False``): a new batch size compiles once more.

    TorchScript modules are moved, switched to eval and frozen (+ ``optimize_for_inference``
    where the default precision is fp32; see :func:`_optimize_torchscript`). The caller's model is not mutated
    unless ``inplace=True`` (which saves one copy of the weights, e.g. for memory measurements).
    Mixed precision is left to the caller (``torch.autocast``): the weights stay fp32.
    """
    device = torch.device(device)
    mode = resolve_compile_mode(compile, device, cuda_graph_batch)
    if isinstance(model, torch.jit.ScriptModule):
        return _optimize_torchscript(model, device)
    prepared = (model if inplace else copy.deepcopy(model)).eval()
    n_folded = fold_batchnorm(prepared)
    prepared.to(device)
    if channels_last and any(isinstance(m, nn.Conv2d) for m in prepared.modules()):
        prepared.to(memory_format=torch.channels_last)
    logger.info("prepared %s for inference on %s: %d BatchNorms folded, channels_last=%s, compile=%s",
                type(model).__name__, device, n_folded, channels_last, mode or "off")
    if mode is None:
        return prepared
    # torch.compile of a Module returns an OptimizedModule (a Module); its stubs say only "callable"
    compiled = cast(nn.Module, torch.compile(prepared, mode=mode, dynamic=False))
    if mode == "reduce-overhead" and device.type == "cuda":
        return _CudaGraphModule(compiled)
    return compiled
