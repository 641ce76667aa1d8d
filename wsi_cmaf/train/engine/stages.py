"""What changes between the paper's three training stages (Sec. 4.5).

* ``branches`` — the spatial (ResNet) and contextual (MobileViT) extractors are trained
  *independently* with cross-entropy: each gets a temporary linear head on its globally pooled
  feature map (:class:`BranchHeads`); the two losses touch disjoint parameters, so summing them
  trains each branch exactly as if it were alone. The fusion block and the real head are frozen.
* ``fusion`` — the extractors are frozen (weights *and* BatchNorm statistics); the CMAF block,
  bottlenecks and head learn, with the IB weights ramped up.
* ``all`` — everything is unfrozen.

A multi-task wrapper (``multitask`` / ``multiview`` with a CMAF-Net backbone) goes through the same
stages: the stages act on its backbone's extractors (:func:`core_model`), the wrapper's view
attention and task heads train with the fusion block (``fusion`` and ``all``); ``branches``
trains the extractors on the primary task's labels. With a timm backbone there are no extractors:
only ``all`` applies (a ``branches`` stage is refused by :class:`BranchHeads`).

Optimiser: AdamW with weight decay on weights only (biases, norm and other 1-d parameters such
as the log-temperatures get none: timm's ``param_groups_weight_decay``), optionally wrapped in SAM.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.models.multiview import MultiViewNet, ViewBatch
from wsi_cmaf.train.config import OptimConfig, StageConfig
from wsi_cmaf.train.engine.sam import SAM
from wsi_cmaf.train.engine.schedules import build_scheduler

logger = logging.getLogger(__name__)

EXTRACTORS = ("spatial", "contextual")
#: Devices whose AdamW has a fused kernel (torch >= 2.4 for "cpu").
FUSED_DEVICES = {"cuda", "cpu"}


def core_model(model: nn.Module) -> nn.Module:
    """The network whose extractors the stages act on: a multi-task / multi-view wrapper's
    backbone, else the model itself."""
    inner = getattr(model, "backbone", None)
    return inner if isinstance(model, MultiViewNet) and isinstance(inner, nn.Module) else model


def extractors(model: nn.Module) -> dict[str, nn.Module]:
    """The feature-extractor branches a CMAF-Net has (``spatial``, ``contextual``), also inside a wrapper."""
    model = core_model(model)
    return {n: getattr(model, n) for n in EXTRACTORS if getattr(model, n, None) is not None}


class BranchHeads(nn.Module):
    """Stage-1 linear heads, one per extractor, on globally average-pooled features."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        # duck-typed (any model with CMAF-Net's branches); nn.Module types such attributes Tensor | Module
        core: Any = core_model(model)
        dims: dict[str, int] = {}
        if getattr(core, "spatial", None) is not None:
            dims["spatial"] = core.spatial.out_channels
        if getattr(core, "contextual", None) is not None:
            dims["contextual"] = core.config.context_dim
        if not dims:
            raise ConfigError("stage 'branches' needs a model with spatial and/or contextual branches")
        self.heads = nn.ModuleDict({n: nn.Linear(d, num_classes) for n, d in dims.items()})

    def forward(self, model: nn.Module, x: torch.Tensor | ViewBatch) -> dict[str, torch.Tensor]:
        """Logits of each branch's head: ``{"spatial": (B, C), "contextual": (B, C)}``.

        A multi-view batch gives its anchor view (the tile itself): stage 1 pre-trains the
        backbone's branches on the tile, whose label it is; the context views join in stage 2.
        """
        if isinstance(x, ViewBatch):
            x = x.anchor
        model = core_model(model)
        return {n: head(getattr(model, n)(x).mean(dim=(2, 3))) for n, head in self.heads.items()}


def configure_trainable(model: nn.Module, heads: nn.Module | None, kind: str) -> None:
    """Set ``requires_grad`` for a stage kind ("branches", "fusion", "all")."""
    ext = extractors(model)
    for p in model.parameters():
        p.requires_grad_(kind in ("fusion", "all"))
    if kind == "branches":
        for module in ext.values():
            module.requires_grad_(True)
    elif kind == "fusion":
        for module in ext.values():
            module.requires_grad_(False)
    if heads is not None:
        heads.requires_grad_(kind == "branches")
    # A fixed temperature ("w/o temperature learning") must stay fixed whatever the stage.
    arch = getattr(core_model(model), "config", None)
    for name, p in model.named_parameters():
        if name.endswith("log_tau") and not getattr(arch, "learn_temperature", True):
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, heads: nn.Module | None, kind: str) -> None:
    """``model.train()``, but frozen extractors keep their BatchNorm statistics (eval mode)."""
    model.train()
    if heads is not None:
        heads.train(kind == "branches")
    if kind == "fusion":
        for module in extractors(model).values():
            module.eval()


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics but do not update their running ones.

    Used for SAM's second forward pass at the perturbed weights ``w + ε``: those statistics
    belong to weights the model never takes.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def trainable_parameters(*modules: nn.Module | None) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` across ``modules`` (duplicates removed)."""
    seen: set[int] = set()
    out = []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def build_optimizer(modules: dict[str, nn.Module | None], optim: OptimConfig, lr: float) -> Optimizer:
    """AdamW (wrapped in SAM when ``optim.sam``) over the trainable parameters of ``modules``."""
    holder = nn.ModuleDict({k: v for k, v in modules.items() if v is not None})
    groups = param_groups_weight_decay(holder, weight_decay=optim.weight_decay)
    if not any(g["params"] for g in groups):
        raise ConfigError("this stage has no trainable parameters")
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(optim.betas)}
    # Fused AdamW can skip a step with non-finite gradients on the device (the trainer passes it
    # ``found_inf`` as GradScaler does), so the training step needs no host sync; same update rule.
    devices = {p.device.type for g in groups for p in g["params"]}
    if devices <= FUSED_DEVICES:
        kwargs["fused"] = True
    if optim.sam:
        return SAM(groups, torch.optim.AdamW, rho=optim.sam_rho, adaptive=optim.sam_adaptive, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def build_stage_scheduler(stage: StageConfig, optimizer: Optimizer, steps_per_epoch: int) -> LRScheduler:
    """The stage's per-step learning-rate schedule (cosine / warm-up / cyclic ...)."""
    total = max(stage.epochs * steps_per_epoch, 1)
    warm = int(round(stage.warmup_epochs * steps_per_epoch))
    name = stage.schedule.lower()
    if name == "cosine":
        return build_scheduler("cosine", optimizer, total_steps=total)
    if name == "warmup":
        return build_scheduler("warmup", optimizer, warmup_steps=min(warm, total))
    if name == "warmup_cosine":
        return build_scheduler("warmup_cosine", optimizer, total_steps=total,
                               warmup_steps=min(warm, total - 1))
    if name == "cyclic":
        up = max(int(round(stage.cycle_epochs * steps_per_epoch)), 1)
        return build_scheduler("cyclic", optimizer, step_size_up=up)
    return build_scheduler(name, optimizer)


def ramp_steps(stage: StageConfig, steps_per_epoch: int) -> int:
    """IB ramp length in optimiser steps for the stage's ``ib`` mode (0 = at target at once)."""
    if stage.ib == "ramp":
        return max(int(math.ceil(stage.epochs * steps_per_epoch)), 1)
    return 0


def enable_grad_checkpointing(model: nn.Module) -> bool:
    """Activation checkpointing: timm's ``set_grad_checkpointing`` when the model has it, else
    each CMAF-Net extractor's forward is wrapped in ``torch.utils.checkpoint`` (non-reentrant).

    Wrapping replaces the instance's ``forward`` only, so parameter names (and checkpoints)
    are unchanged. Returns whether anything was enabled.
    """
    set_grad_checkpointing = getattr(model, "set_grad_checkpointing", None)
    if set_grad_checkpointing is not None:
        set_grad_checkpointing(True)
        return True
    from torch.utils.checkpoint import checkpoint

    done = False
    for module in extractors(model).values():
        inner = module.forward

        def wrapped(*args, _inner=inner, _module=module, **kwargs):
            if _module.training and torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        module.forward = wrapped
        done = True
    return done


# ----------------------------------------------------------------------------- torch.compile
def compile_mode(setting: str, device: torch.device) -> str | None:
    """The ``torch.compile`` mode for a ``compile`` setting on ``device``; None = stay eager.

    "auto" compiles on CUDA only (on CPU compilation costs more than it saves in short runs),
    "on" compiles anywhere with the default mode, a mode name compiles with that mode.
    """
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    return "default" if setting in ("auto", "on") else setting


def compile_for_training(model: nn.Module, heads: nn.Module | None, mode: str, backend: str = "inductor") -> None:
    """Compile, in place, the calls the training loop makes.

    ``model.compile()`` (not ``torch.compile(model)``) keeps the module itself, so ``state_dict``
    keys get no ``_orig_mod.`` prefix and checkpoints stay interchangeable with eager runs.
    ``forward_with_aux`` (CMAF-Net's training forward) is compiled as an instance attribute and the
    stage-1 branch heads as a module; each unit is compiled once, never nested.
    """
    kwargs: dict[str, Any] = {"backend": backend}
    if backend == "inductor":
        kwargs["mode"] = mode
    model.compile(**kwargs)
    forward_with_aux = getattr(model, "forward_with_aux", None)
    if callable(forward_with_aux):
        # torch's stubs type a Module's attributes Tensor | Module, so assigning a function is refused
        model.forward_with_aux = torch.compile(forward_with_aux, **kwargs)  # type: ignore[assignment]
    if heads is not None:
        heads.compile(**kwargs)
    # The per-class gradient norms take several backward passes through one graph
    # (retain_graph=True); AOTAutograd's donated buffers would forbid that.
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    logger.info("torch.compile: mode %s, backend %s", mode, backend)
