"""A tour of CMAF-Net: parameters and FLOPs per component, output shapes, the aux dict, ablations.

Run:  python examples/model_tour.py [--input-size 224] [--ablations]
Everything is randomly initialised (no pretrained weights exist); CPU is fine.
"""

from __future__ import annotations

import argparse
import time

import torch

from wsi_cmaf.models import ABLATIONS, create_model
from wsi_cmaf.models.profile import count_flops, count_parameters

PAPER = {"params_M": 12.3, "GFLOPs (likely MACs)": 2.9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--ablations", action="store_true", help="also size every Table 6 ablation")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model("cmaf_net", num_classes=2).eval()
    size = args.input_size

    params = count_parameters(model)
    flops = count_flops(model, size)
    print(f"CMAF-Net at {size}x{size} (paper: {PAPER})")
    print(f"{'component':<14}{'params (M)':>12}{'GMACs':>10}{'GFLOPs (2/MAC)':>16}")
    for name in params:
        f = flops.get(name, 0)
        print(f"{name:<14}{params[name] / 1e6:>12.3f}{f / 2e9:>10.3f}{f / 1e9:>16.3f}")

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(x)
        t1 = time.perf_counter()
        _, aux = model.forward_with_aux(x)
        f_s, f_t = model.spatial(x), model.contextual(x)
    print(f"\ninput {tuple(x.shape)} -> F_s {tuple(f_s.shape)}, F_t {tuple(f_t.shape)}, "
          f"logits {tuple(logits.shape)}  ({(t1 - t0) * 1000:.0f} ms for the batch on CPU)")
    print("aux dict (forward_with_aux):")
    for key, value in aux.items():
        print(f"  {key:<18} {tuple(value.shape)}")
    print(f"tau per head: {[round(t, 3) for t in aux['tau'].tolist()]}")
    print(f"attention entropy per head (nats, max {torch.log(torch.tensor(float(aux['attn'].shape[-1]))):.2f}): "
          f"{[round(e, 3) for e in aux['attn_entropy'].tolist()]}")

    if args.ablations:
        print("\nTable 6 ablations:")
        for name in ABLATIONS:
            m = create_model("cmaf_net", ablation=name).eval()
            n = count_parameters(m)["total"]
            g = count_flops(m, size)["total"] / 2e9
            print(f"  {name:<18} {n / 1e6:7.3f} M params  {g:6.3f} GMACs")


if __name__ == "__main__":
    main()
