"""Table 8 output: Markdown tables (per model, per setting, floors) and the throughput plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def markdown_efficiency(table: pd.DataFrame, long: pd.DataFrame | None = None,
                        floors: list[dict[str, Any]] | None = None) -> str:
    """Markdown of the Table 8 frames: one row per model, then one per setting, then the floors."""
    cols = ["model", "params_M", "gmacs", "gflops", "peak_memory_MiB", "images_per_s"]
    head = ["Model", "Params (M)", "GMACs", "GFLOPs (2/MAC)", "Peak memory (MiB)", "Images/s"]
    lines = ["### Table 8: efficiency", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join([str(r["model"])] + [f"{r[c]:.3g}" if c != "images_per_s" else f"{r[c]:.1f}"
                                                             for c in cols[1:]]) + " |")
    first = table.iloc[0]
    lines += ["", f"Input {int(first['input_size'])}², batch {int(first['batch_size'])}, {first['precision']}, "
              f"compile {first['compile']}, device {first['device']}, inference mode, every model prepared by "
              f"prepare_for_inference (BatchNorm folded, channels_last); peak memory = {first['memory_method']} "
              "(memory above the level before the model was built)."]
    if str(first["device"]).startswith("cpu"):
        lines += ["", "On CPU, CMAF-Net runs its high-resolution stages in chunks of a few images in eval mode "
                  "(wsi_cmaf.models.blocking; identical outputs), which mostly saves page faults on fresh "
                  "activations; the timm baselines run as timm ships them. benchmarks/bench_cache_blocking.py "
                  "times ResNet-50 with the same blocking done by hand, for the like-for-like ratio."]
    if long is not None and not long.empty:
        lines += ["", "#### Throughput per setting", "",
                  "| Model | Precision | Compile | Batch | Images/s | ms per batch | First call (s) |",
                  "|---|---|---|---|---|---|---|"]
        for _, r in long.iterrows():
            lines.append(f"| {r['model']} | {r['precision']} | {r['compile_mode']} | {int(r['batch'])} | "
                         f"{r['images_per_s']:.1f} | {r['latency_ms']:.2f} | {r['warmup_s']:.1f} |")
    if floors:
        lines += ["", "#### Floors", "", "| Floor | Setting | Value | Minimum | OK |", "|---|---|---|---|---|"]
        for f in floors:
            lines.append(f"| {f['floor']} ({f['note']}) | {f['setting']} on {f['device']} | {f['value']:.3f} | "
                         f"{f['minimum']} | {'yes' if f['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot_efficiency(table: pd.DataFrame, path: Path) -> None:
    """Throughput against compute, marker size ~ parameters."""
    from wsi_cmaf.train.paper.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(table["gmacs"], table["images_per_s"], s=20 + 8 * table["params_M"], alpha=0.6)
    for _, r in table.iterrows():
        ax.annotate(str(r["model"]).removeprefix("timm:"), (r["gmacs"], r["images_per_s"]), fontsize=7)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("images / s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
