"""Measure the scales of CMAF-Net's loss terms at initialisation (the numbers behind MODEL.md "Loss scales").

Prints, for a randomly initialised CMAF-Net (default config, 224 px, batch 16, noise images):

* the value of each term of the objective (task A-CBFL and the weighted regularisers) under a
  :class:`~wsi_cmaf.losses.LossConfig` (the default, and the ``paper_literal`` preset);
* the gradient norm of each weighted term on the CMAF block, on the bottlenecks and on all
  parameters (β ramp at its target, as in stage 3);
* the optimum p* of the per-sample A-CBFL of a correct prediction for λ in {0, 0.1} (closed form
  in one variable, solved on a grid).

Usage (about a minute on 2 CPU cores)::

    python benchmarks/measure_loss_scales.py [--batch 16] [--size 224]
"""

from __future__ import annotations

import argparse
import math

import torch

from wsi_cmaf.losses import IBObjective, LossConfig, create_loss
from wsi_cmaf.losses.objective import REG_TERMS
from wsi_cmaf.models import create_model


def optimum_p(gamma: float, alpha: float, lam: float) -> float:
    """argmax over p of −ℓ(p) for a binary correct prediction: ℓ = −α(1−p)^γ log p − λH(p)."""
    best_p, best = 0.5, math.inf
    for i in range(1, 100_000):
        p = 0.5 + 0.5 * i / 100_000
        h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        v = -alpha * (1 - p) ** gamma * math.log(p) - lam * h
        if v < best:
            best, best_p = v, p
    return best_p


def grad_norm(value: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    """‖∂value/∂params‖₂ (0 when value does not depend on them)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    counts = [70, 30]

    print("p* of a correct prediction (A-CBFL, -λH), α = 1:")
    for ratio, minority in (("70:30", 0.3), ("95:5", 0.05), ("99:1", 0.01)):
        loss = create_loss("acbfl", [1 - minority, minority])
        g_maj, g_min = (float(v) for v in loss.gammas)
        print(f"  {ratio}: majority γ={g_maj:.3f} p*(λ=0.1)={optimum_p(g_maj, 1, 0.1):.3f}; "
              f"minority γ={g_min:.3f} p*(λ=0.1)={optimum_p(g_min, 1, 0.1):.3f}; p*(λ=0)=1")

    model = create_model("cmaf_net", num_classes=2)
    model.train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = (torch.arange(args.batch) % 10 < 3).long()  # 30 % positives
    logits, aux = model.forward_with_aux(x)
    groups = {
        "cmaf": [p for n, p in model.named_parameters() if n.startswith("cmaf.")],
        "bottleneck": [p for n, p in model.named_parameters() if n.startswith("vib_")],
        "all": list(model.parameters()),
    }
    groups = {k: v for k, v in groups.items() if v}
    for preset in ("default", "paper_literal"):
        cfg = LossConfig() if preset == "default" else LossConfig.preset(preset)
        obj = IBObjective(cfg, counts)
        obj.update(10**9)  # ramp finished (stage 3)
        obj.set_progress(0.0)
        task = obj.task_loss(logits, y)
        task = (task * obj.ib_weights[y]).mean() if cfg.class_weighted_ib else task.mean()
        raw = obj._aux_terms(aux)
        print(f"\n[{preset}] loss={cfg.loss} kwargs={cfg.loss_kwargs} kl_normalization={cfg.kl_normalization}")
        rows = [("task", task)] + [(n, getattr(cfg, REG_TERMS[n][0]) * v) for n, v in raw.items()]
        for name, value in rows:
            norms = "  ".join(f"{g}={grad_norm(value, ps):.2e}" for g, ps in groups.items())
            print(f"  {name:18s} value={float(value.detach()):+.4e}  grad: {norms}")


if __name__ == "__main__":
    main()
