"""Parameter and FLOP accounting per component (for MODEL.md, the tour and the size tests).

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which counts one
multiply-add as **2 FLOPs**. The paper's "2.9 GFLOPs" is almost surely multiply-accumulates
(its Table 8 lists ResNet-50 at 4.1 G, which is ResNet-50's MAC count), so we report both and
compare MACs = FLOPs / 2 with the paper. Only matmul/conv/attention ops are counted (as in
fvcore/ptflops-style counts); element-wise ops are ignored.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level child plus ``"total"`` (buffers excluded)."""
    out = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    out = {k: v for k, v in out.items() if v}
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


@torch.no_grad()
def count_flops(model: nn.Module, input_size: int = 224, batch: int = 1) -> dict[str, int]:
    """FLOPs (2 per MAC) of one forward pass per top-level child plus ``"total"``, per image."""
    was_training = model.training
    model.eval()
    x = torch.randn(batch, 3, input_size, input_size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    out: dict[str, int] = {}
    for name, _ in model.named_children():
        ops = counts.get(prefix + name, {})
        total = int(sum(ops.values()))
        if total:
            out[name] = total // batch
    out["total"] = int(counter.get_total_flops()) // batch
    return out
