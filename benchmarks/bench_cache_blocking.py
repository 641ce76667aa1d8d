"""What batch blocking buys CMAF-Net on a CPU, and what the same trick would buy ResNet-50 (issue 19).

CMAF-Net runs its memory-bound high-resolution stages (the MobileViT branch before its first
transformer, the ResNet-18 stem) in chunks of a few images in eval mode on CPU
(:mod:`wsi_cmaf.models.blocking`). Table 8 compares it with timm's ResNet-50 as timm ships it.
To keep that comparison honest this script also times a ResNet-50 whose stem and first stage
are blocked *by hand* in the same way, i.e. the ratio CMAF-Net would have against a baseline that
got the same treatment.

Four models, all after ``prepare_for_inference`` (BN folded, channels_last), eval, fp32, eager:
CMAF-Net blocked (the default), CMAF-Net unblocked (``cpu_chunk = 0``), ResNet-50 as shipped and
ResNet-50 blocked by hand. They are timed in turn, round after round, so a shared machine's
changing load hits them alike; the table gives the median images/s and the median per-round
ratio to ResNet-50 as shipped. Outputs of the blocked and unblocked forms are checked equal.

Usage (about 2 minutes on 2 CPU cores)::

    python benchmarks/bench_cache_blocking.py [--threads 2] [--batch 32] [--rounds 8] [--chunk 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
from torch import nn

from wsi_cmaf.models import create_model
from wsi_cmaf.models.blocking import cpu_chunk_size, run_blocked
from wsi_cmaf.models.optimize import prepare_for_inference


class BlockedResNet(nn.Module):
    """A timm ResNet whose stem and ``layer1`` run in chunks (the counterfactual baseline)."""

    def __init__(self, net: nn.Module, chunk: int | None) -> None:
        super().__init__()
        self.net = net
        self.cpu_chunk = chunk

    def _early(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        return n.layer1(n.maxpool(n.act1(n.bn1(n.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = run_blocked(self._early, x, cpu_chunk_size(self, x))
        return n.forward_head(n.layer4(n.layer3(n.layer2(x))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=0, help="images per chunk (0: the library's choice)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    chunk = args.chunk or None

    cmaf = prepare_for_inference(create_model("cmaf_net", input_size=args.size), cpu)
    cmaf_plain = prepare_for_inference(create_model("cmaf_net", input_size=args.size), cpu)
    cmaf_plain.load_state_dict(cmaf.state_dict())
    cmaf.spatial.cpu_chunk = cmaf.contextual.cpu_chunk = chunk
    cmaf_plain.spatial.cpu_chunk = cmaf_plain.contextual.cpu_chunk = 0
    r50 = prepare_for_inference(timm.create_model("resnet50"), cpu)
    r50_blocked = BlockedResNet(r50, chunk).eval()
    models = {"cmaf_net (blocked, default)": cmaf, "cmaf_net (unblocked)": cmaf_plain,
              "resnet50 (timm, as shipped)": r50, "resnet50 (stem + layer1 blocked by hand)": r50_blocked}

    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        same_cmaf = torch.equal(cmaf(x), cmaf_plain(x))
        same_r50 = torch.equal(r50(x), r50_blocked(x))
        for m in models.values():  # warm-up
            m(x)
        for _ in range(args.rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    ref = times["resnet50 (timm, as shipped)"]
    rows = []
    for name, ts in times.items():
        ratio = statistics.median(r / t for r, t in zip(ref, ts))
        rows.append({"model": name, "images_per_s": args.batch / statistics.median(ts),
                     "ratio_to_resnet50": ratio})
    k = cpu_chunk_size(cmaf.contextual, x)
    print(f"batch {args.batch}, {args.size} px, fp32 eager, {args.threads} threads, chunk {k}, "
          f"{args.rounds} rounds; outputs identical blocked vs unblocked: CMAF-Net {same_cmaf}, "
          f"ResNet-50 {same_r50}")
    print("| model | images/s (median) | / ResNet-50 as shipped (median per round) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['images_per_s']:.1f} | {r['ratio_to_resnet50']:.2f}x |")
    fair = statistics.median(b / c for b, c in zip(times["resnet50 (stem + layer1 blocked by hand)"],
                                                    times["cmaf_net (blocked, default)"]))
    print(f"CMAF-Net blocked / ResNet-50 blocked by hand (median per round): {fair:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "chunk": k, "rows": rows, "blocked_vs_blocked": fair,
                       "identical": {"cmaf_net": same_cmaf, "resnet50": same_r50}, "raw_s": times}, fh, indent=2)


if __name__ == "__main__":
    main()
