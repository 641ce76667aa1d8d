"""Cost of CMAF-Net's context branch with the VSSM mixer against the MobileViT one (issue 17).

Both branches are built from the default :class:`~wsi_cmaf.models.CMAFConfig` (the same
MobileViT layout, channels and depths); only ``context_branch`` differs. For each it reports
parameters, multiply-adds counted by :func:`wsi_cmaf.models.profile.count_flops` (matmuls,
convolutions, attention; FLOPs / 2) and the element-wise work of the selective scans, which the
counter does not see, then CPU latency per image after ``prepare_for_inference`` (eval, BN folded,
eager), median of ``--reps`` timed runs after one warm-up, at batch 1 and batch 32. The two
branches are timed alternately and the median per-run ratio is reported too, which a shared
machine's changing load distorts less than either time.

Usage (a few minutes on 2 CPU cores)::

    python benchmarks/bench_vssm.py [--size 224] [--threads 2] [--batches 1 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from wsi_cmaf.models import create_model
from wsi_cmaf.models.contextual import ContextualBlock
from wsi_cmaf.models.optimize import prepare_for_inference
from wsi_cmaf.models.profile import count_flops

BRANCHES = ("mobilevit", "vssm")


def scan_elements(branch: torch.nn.Module, size: int) -> int:
    """Elements of one (4, d_inner, L, d_state) scan tensor summed over the VSS blocks, per image.

    The scan makes ~12 element-wise passes over tensors of this size (clamps, cumsums, exp,
    divisions, products), none of which FlopCounterMode counts.
    """
    total = 0
    for stride_log, body in zip(range(2, 6), branch.bodies):
        side = -(-size // 2 ** stride_log)
        if isinstance(body, ContextualBlock) and body.mixer == "vssm":
            for blk in body.transformer:
                ss = blk.ss2d
                total += 4 * ss.d_inner * side * side * ss.d_state
    return total


def _run_s(model: torch.nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, prepared = {}, {}
    for branch in BRANCHES:
        torch.manual_seed(0)
        ctx = create_model("cmaf_net", context_branch=branch).contextual
        rows[branch] = {"branch": branch,
                        "params_M": round(sum(p.numel() for p in ctx.parameters()) / 1e6, 3),
                        "GMACs_counted": round(count_flops(ctx, args.size)["total"] / 2e9, 3),
                        "scan_Melements": round(scan_elements(ctx, args.size) / 1e6, 2)}
        prepared[branch] = prepare_for_inference(ctx, "cpu", compile="off")
    for b in args.batches:
        x = torch.randn(b, 3, args.size, args.size)
        times: dict[str, list[float]] = {br: [] for br in BRANCHES}
        with torch.inference_mode():
            for model in prepared.values():
                model(x)  # warm-up
            # Interleaved: on a shared machine both branches then see the same background load,
            # so the per-repetition ratio is steadier than either time.
            for _ in range(args.reps):
                for br in BRANCHES:
                    times[br].append(_run_s(prepared[br], x))
        ratios = [v / m for v, m in zip(times["vssm"], times["mobilevit"])]
        for br in BRANCHES:
            rows[br][f"ms_per_image_b{b}"] = round(1000.0 * statistics.median(times[br]) / b, 1)
        rows["vssm"][f"time_ratio_b{b}"] = round(statistics.median(ratios), 2)
    for row in rows.values():
        print(json.dumps(row), flush=True)
    print(f"# torch {torch.__version__}, {args.threads} threads, {args.size} px, median of {args.reps} "
          "interleaved runs; time_ratio = median over runs of vssm / mobilevit")


if __name__ == "__main__":
    main()
