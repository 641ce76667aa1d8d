"""Tables and figures of the paper protocols (see :mod:`wsi_cmaf.train.paper.protocols`).

Per run one flat row (labels, validation metrics of the best epoch, test metrics with their
bootstrap CI bounds, time); per setting (the protocol's label columns, seed excluded) the mean
and sample standard deviation over seeds. Written files, in the protocol folder:

* ``results_per_seed.csv``: one row per run;
* ``results.csv``: one row per setting, ``<metric>_mean`` / ``<metric>_std`` / ``n_seeds``;
* ``results.md``: the setting table as Markdown, ``mean ± std`` per headline metric;
* figures: ``fig3_imbalance.png`` (imbalance), ``fig4_tau_entropy*.png`` (fig4, temperature),
  ``<protocol>_bars.png`` (table1, ablations).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_cmaf.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Headline metrics of the Markdown tables (test split), in order.
HEADLINE = ("sensitivity", "specificity", "balanced_accuracy", "auprc", "mcc", "f1")
_LABEL_NAMES = {"sensitivity": "Sensitivity", "specificity": "Specificity", "balanced_accuracy": "Bal. acc.",
                "auprc": "AUPRC", "mcc": "MCC", "f1": "F1", "macro_f1": "Macro F1"}


# ----------------------------------------------------------------------------- rows
def _num(value: Any) -> float:
    """A metric as float; None (how strict JSON stores NaN) -> NaN."""
    return math.nan if value is None else float(value)


def _test_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flatten a full_report ``metrics`` block: ``{name: {value, ci_low, ci_high}}``, plain floats,
    or ``name`` + ``name_ci`` (low, high) pairs -> ``test_<name>``, ``test_<name>_ci_low/high``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping) and "value" in value:
            out[f"test_{key}"] = _num(value["value"])
            for bound in ("ci_low", "ci_high"):
                if value.get(bound) is not None:
                    out[f"test_{key}_{bound}"] = float(value[bound])
        elif key.endswith("_ci") and isinstance(value, Mapping):
            for bound in ("ci_low", "ci_high"):
                if value.get(bound) is not None:
                    out[f"test_{key[:-3]}_{bound}"] = float(value[bound])
        elif key.endswith("_ci") and isinstance(value, (list, tuple)) and len(value) == 2:
            out[f"test_{key[:-3]}_ci_low"], out[f"test_{key[:-3]}_ci_high"] = (float(v) for v in value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"test_{key}"] = float(value)
    return out


def result_row(run: str, labels: Mapping[str, Any], result: Any) -> dict[str, Any]:
    """One flat table row from a :class:`~wsi_cmaf.train.engine.trainer.TrainResult`."""
    row: dict[str, Any] = {"run": run, **labels}
    row.update({f"val_{k}": _num(v) for k, v in (result.best_val or {}).items()
                if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))})
    row.update(_test_values((result.test_metrics or {}).get("metrics", {})))
    row["best_epoch"] = int(result.best_epoch)
    row["train_seconds"] = float(result.seconds)
    return row


# ----------------------------------------------------------------------------- aggregation
def metric_columns(frame: pd.DataFrame, group_by: Sequence[str]) -> list[str]:
    """Numeric columns that are metrics (not labels, seeds, CI bounds or bookkeeping)."""
    skip = set(group_by) | {"seed", "run", "best_epoch"}
    return [c for c in frame.columns if c not in skip and not c.endswith(("_ci_low", "_ci_high"))
            and pd.api.types.is_numeric_dtype(frame[c])]


def aggregate(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str]) -> pd.DataFrame:
    """Mean and sample std (ddof=1; NaN with one seed) over seeds per setting, settings in run order."""
    if not rows:
        raise DataError("no finished runs to aggregate")
    frame = pd.DataFrame(list(rows))
    missing = [c for c in group_by if c not in frame.columns]
    if missing:
        raise ConfigError(f"rows lack the setting column(s) {missing}")
    metrics = metric_columns(frame, group_by)
    grouped = frame.groupby(list(group_by), sort=False, dropna=False)
    mean = grouped[metrics].mean().add_suffix("_mean")
    std = grouped[metrics].std(ddof=1).add_suffix("_std")
    n = grouped.size().rename("n_seeds")
    table = pd.concat([n, mean, std], axis=1)
    ordered = ["n_seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    return table[ordered].reset_index()


def _fmt(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def markdown_table(table: pd.DataFrame, group_by: Sequence[str], title: str = "") -> str:
    """Markdown of an :func:`aggregate` table: settings, seeds, ``mean ± std`` per headline metric."""
    metrics = [m for m in ("val_balanced_accuracy",) + tuple(f"test_{h}" for h in HEADLINE + ("macro_f1",))
               if f"{m}_mean" in table.columns]
    header = list(group_by) + ["seeds"] + [
        ("val " if m.startswith("val_") else "") + _LABEL_NAMES.get(m.split("_", 1)[1], m) for m in metrics]
    lines = ([f"### {title}", ""] if title else []) + [
        "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, r in table.iterrows():
        cells = [str(r[c]) for c in group_by] + [str(int(r["n_seeds"]))]
        cells += [_fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test-split metrics, mean ± sample std over seeds; 'val' = validation at the selected epoch."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ratio_minority_percent(ratio: str) -> float:
    """``"95:5"`` -> 5.0 (minority share in percent)."""
    a, b = (float(p) for p in str(ratio).split(":"))
    return 100.0 * b / (a + b)


def plot_imbalance(table: pd.DataFrame, path: str | Path,
                   metrics: Sequence[str] = ("sensitivity", "balanced_accuracy", "auprc")) -> Path:
    """Fig. 3: test metrics against the training imbalance ratio, one line per loss, ±std bars."""
    plt = _pyplot()
    ratios = sorted(table["ratio"].unique(), key=ratio_minority_percent, reverse=True)
    x = np.arange(len(ratios))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        col = f"test_{metric}"
        if f"{col}_mean" not in table.columns:
            ax.set_visible(False)
            continue
        for k, (loss, part) in enumerate(table.groupby("loss", sort=False)):
            part = part.set_index("ratio").reindex(ratios)
            offset = (k - 0.5 * (table["loss"].nunique() - 1)) * 0.06  # keep error bars apart
            ax.errorbar(x + offset, part[f"{col}_mean"], yerr=part[f"{col}_std"].fillna(0.0), marker="o",
                        capsize=3, label=str(loss))
        ax.set_xticks(x, ratios)
        ax.set_xlabel("training ratio (negative:positive)")
        ax.set_title(f"test {_LABEL_NAMES.get(metric, metric)}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bars(table: pd.DataFrame, group_by: Sequence[str], path: str | Path,
              metrics: Sequence[str] = ("sensitivity", "balanced_accuracy", "auprc")) -> Path:
    """Grouped bars (mean ± std) of test metrics per setting (Table 1 / Table 6 at a glance)."""
    plt = _pyplot()
    names = [" / ".join(str(r[c]) for c in group_by) for _, r in table.iterrows()]
    present = [m for m in metrics if f"test_{m}_mean" in table.columns]
    if not present:
        raise DataError("no test metrics to plot")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) * len(present)), 4.0))
    width = 0.8 / len(present)
    x = np.arange(len(names))
    for k, m in enumerate(present):
        ax.bar(x + (k - (len(present) - 1) / 2) * width, table[f"test_{m}_mean"],
               yerr=table[f"test_{m}_std"].fillna(0.0), width=width, capsize=2, label=_LABEL_NAMES.get(m, m))
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tau_entropy(log_jsonl: str | Path, path: str | Path, title: str = "") -> Path:
    """Fig. 4: per-head temperature τ and attention entropy against the optimiser step, plus, for a
    run with DFA, the per-class bias and class attention mass of the DFA readout.

    Reads the ``step`` rows of a CMAF-Net run's ``log.jsonl`` (keys ``tau/<h>``, ``attn_entropy/<h>``,
    ``dfa_bias/<c>``, ``dfa_mass/<c>``).
    """
    from wsi_cmaf.train.engine.logging_utils import read_jsonl

    log_jsonl = Path(log_jsonl)
    if log_jsonl.is_dir():
        log_jsonl = log_jsonl / "log.jsonl"
    if not log_jsonl.is_file():
        raise DataError(f"{log_jsonl}: no run log; give a CMAF-Net run's log.jsonl (or its folder)")
    rows = [r for r in read_jsonl(log_jsonl, kind="step") if "step" in r]
    series = {}
    for prefix in ("tau", "attn_entropy", "dfa_bias", "dfa_mass"):
        keys = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith(prefix + "/")}, key=int)
        series[prefix] = {h: [(r["step"], r[f"{prefix}/{h}"]) for r in rows
                              if r.get(f"{prefix}/{h}") is not None] for h in keys}
    if not series["tau"] and not series["attn_entropy"]:
        raise DataError(f"{log_jsonl}: step rows carry no tau/<h> or attn_entropy/<h> (not a CMAF-Net run?)")
    panels = [("tau", "temperature τ", "head"), ("attn_entropy", "attention entropy (nats)", "head")]
    if series["dfa_bias"]:
        panels += [("dfa_bias", "DFA class bias (mean over heads)", "class"),
                   ("dfa_mass", "DFA class attention mass", "class")]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (prefix, label, what) in zip(axes, panels):
        for h, points in series[prefix].items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=f"{what} {h}", lw=1.2)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if prefix in ("tau", "dfa_bias"):
            ax.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- whole report
def write_tables(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str], out_dir: str | Path,
                 title: str = "") -> tuple[pd.DataFrame, str]:
    """Write results_per_seed.csv, results.csv and results.md; return (setting table, Markdown)."""
    out = Path(out_dir)
    pd.DataFrame(list(rows)).to_csv(out / "results_per_seed.csv", index=False)
    table = aggregate(rows, group_by)
    table.to_csv(out / "results.csv", index=False, float_format="%.6g")
    md = markdown_table(table, group_by, title)
    (out / "results.md").write_text(md, encoding="utf-8")
    return table, md


def write_report(protocol: Any, rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> str:
    """Tables and the protocol's figures for a :class:`~wsi_cmaf.train.paper.protocols.Protocol`; returns Markdown."""
    out = Path(out_dir)
    table, md = write_tables(rows, protocol.group_by, out, protocol.title)
    figures: list[Path] = []
    if protocol.name == "imbalance":
        figures.append(plot_imbalance(table, out / "fig3_imbalance.png"))
    elif protocol.name in ("table1", "ablations"):
        figures.append(plot_bars(table, protocol.group_by, out / f"{protocol.name}_bars.png"))
    if protocol.name in ("fig4", "temperature"):
        seen: set[str] = set()
        for spec in protocol.runs:  # first finished seed of each setting
            key = "/".join(str(spec.labels[c]) for c in protocol.group_by)
            record = out / spec.name / "result.json"
            if key in seen or not record.is_file():
                continue
            seen.add(key)
            log_dir = json.loads(record.read_text(encoding="utf-8"))["val_history_path"]
            suffix = "" if protocol.name == "fig4" else "_" + spec.name.split("__")[0]
            figures.append(plot_tau_entropy(log_dir, out / f"fig4_tau_entropy{suffix}.png", title=spec.name))
    for f in figures:
        logger.info("wrote %s", f)
    return md
