"""What changes between the paper's three training stages (Sec. 4.5).

* ``branches`` — the spatial (ResNet) and contextual (MobileViT) extractors are trained
  *independently* with cross-entropy: each gets a temporary linear head on its globally pooled
  feature map (:class:`BranchHeads`); the two losses touch disjoint parameters, so summing them
  trains each branch exactly as if it were alone. The fusion block and the real head are frozen.
* ``fusion`` — the extractors are frozen (weights *and* BatchNorm statistics); the CMAF block,
  bottlenecks and head learn, with the IB weights ramped up.
* ``all`` — everything is unfrozen.

Optimiser: AdamW with weight decay on weights only (biases, norm and other 1-d parameters such
as the log-temperatures get none: timm's ``param_groups_weight_decay``), optionally wrapped in SAM.
"""

from __future__ import annotations

import logging
import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.config import OptimConfig, StageConfig
from wsi_cmaf.train.sam import SAM
from wsi_cmaf.train.schedules import build_scheduler

logger = logging.getLogger(__name__)

EXTRACTORS = ("spatial", "contextual")


def extractors(model: nn.Module) -> dict[str, nn.Module]:
    """The feature-extractor branches a CMAF-Net has (``spatial``, ``contextual``)."""
    return {n: getattr(model, n) for n in EXTRACTORS if getattr(model, n, None) is not None}


class BranchHeads(nn.Module):
    """Stage-1 linear heads, one per extractor, on globally average-pooled features."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        dims = {}
        if getattr(model, "spatial", None) is not None:
            dims["spatial"] = model.spatial.out_channels
        if getattr(model, "contextual", None) is not None:
            dims["contextual"] = model.config.context_dim
        if not dims:
            raise ConfigError("stage 'branches' needs a model with spatial and/or contextual branches")
        self.heads = nn.ModuleDict({n: nn.Linear(d, num_classes) for n, d in dims.items()})

    def forward(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of each branch's head: ``{"spatial": (B, C), "contextual": (B, C)}``."""
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
    for name, p in model.named_parameters():
        if name.endswith("log_tau") and not getattr(getattr(model, "config", None), "learn_temperature", True):
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, heads: nn.Module | None, kind: str) -> None:
    """``model.train()``, but frozen extractors keep their BatchNorm statistics (eval mode)."""
    model.train()
    if heads is not None:
        heads.train(kind == "branches")
    if kind == "fusion":
        for module in extractors(model).values():
            module.eval()


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


def build_optimizer(modules: dict[str, nn.Module], optim: OptimConfig, lr: float) -> Optimizer:
    """AdamW (wrapped in SAM when ``optim.sam``) over the trainable parameters of ``modules``."""
    holder = nn.ModuleDict({k: v for k, v in modules.items() if v is not None})
    groups = param_groups_weight_decay(holder, weight_decay=optim.weight_decay)
    if not any(g["params"] for g in groups):
        raise ConfigError("this stage has no trainable parameters")
    kwargs = {"lr": lr, "betas": tuple(optim.betas)}
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


def agc_parameters(model: nn.Module, heads: nn.Module | None) -> list[nn.Parameter]:
    """Parameters adaptive gradient clipping applies to: all trainable ones except the final
    classifier layer(s) — Brock et al. (2021) found clipping the last linear layer hurts."""
    skip: set[int] = set()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    if isinstance(classifier, nn.Module):
        skip |= {id(p) for p in classifier.parameters()}
    if heads is not None:
        skip |= {id(p) for p in heads.parameters()}
    return [p for p in trainable_parameters(model, heads) if id(p) not in skip]


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The final classifier's parameters (for cheap per-class gradient norms)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    return list(classifier.parameters()) if isinstance(classifier, nn.Module) else []


def enable_grad_checkpointing(model: nn.Module) -> bool:
    """Activation checkpointing: timm's ``set_grad_checkpointing`` when the model has it, else
    each CMAF-Net extractor's forward is wrapped in ``torch.utils.checkpoint`` (non-reentrant).

    Wrapping replaces the instance's ``forward`` only, so parameter names (and checkpoints)
    are unchanged. Returns whether anything was enabled.
    """
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return True
    from torch.utils.checkpoint import checkpoint

    done = False
    for module in extractors(model).values():
        inner = module.forward

        def wrapped(*args, _inner=inner, _module=module, **kwargs):
            if _module.training and torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        module.forward = wrapped  # type: ignore[method-assign]
        done = True
    return done
