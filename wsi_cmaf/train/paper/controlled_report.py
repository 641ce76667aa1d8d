"""Scores, paired differences, table and figure of the controlled imbalance experiment.

Per run (seed × ratio × arm): AUROC, AUPRC, sensitivity at the threshold that gives 95 %
specificity on the validation patients (and the specificity it reaches on test), sensitivity and
specificity at 0.5, expected calibration error, and whether the run is degenerate at 0.5 (it calls
≥ 99.5 % of the test patches one class). Per cell: mean ± sample std over seeds. Paired
differences: for each bootstrap resample of the test *patients* (the same resample for both arms
and every seed) the seed-mean of ``metric(arm) − metric(reference)``; the 2.5/97.5 % quantiles
give the CI, and "wins" counts the seeds where the arm beats the reference on the full test set.

That patient-bootstrap CI holds the trained models fixed: it says how sure we are about *these*
models on other patients, not about another draw of training runs. Two intervals beside it also
carry the seed-to-seed variation: the paired **seed-level** t-interval over the per-seed
differences (full test set), and a **two-level** bootstrap that resamples seeds and test patients
together. A difference is "resolved" in the write-up only where the seed-level interval excludes 0.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_cmaf.train.evaluate.metrics import (
    bootstrap_indices,
    expected_calibration_error,
    rank_auroc,
    threshold_at_specificity,
)
from wsi_cmaf.train.paper.controlled_config import REFERENCE_ARM, ControlledConfig, Data

#: extra paired comparisons beside "every arm vs the reference"
EXTRA_PAIRS = (("acbfl_dfa", "acbfl"), ("acbfl_smooth", "acbfl"), ("acbfl_shipped", "acbfl"),
               ("acbfl_no_class_gamma", "acbfl"), ("acbfl_no_dynamic", "acbfl"), ("acbfl_no_reg", "acbfl"))
DEGENERATE_SHARE = 0.995
#: per-cell columns, in table order
CELL_METRICS = ("auroc", "auprc", "sens_at_spec", "test_spec_at_spec", "sens_at_0.5", "spec_at_0.5", "ece")


def run_scores(y_val: np.ndarray, s_val: np.ndarray, y_test: np.ndarray, s_test: np.ndarray,
               specificity: float) -> dict[str, float]:
    """Every per-run number of the report (test set; threshold chosen on validation)."""
    from sklearn.metrics import average_precision_score

    thr = threshold_at_specificity(y_val, s_val, specificity)
    pos, neg = y_test == 1, y_test == 0
    called = s_test > thr
    half = s_test >= 0.5
    share = float(half.mean())
    return {
        "auroc": rank_auroc(y_test, s_test),
        "auprc": float(average_precision_score(y_test, s_test)),
        "sens_at_spec": float(called[pos].mean()),
        "test_spec_at_spec": float((~called[neg]).mean()),
        "sens_at_0.5": float(half[pos].mean()),
        "spec_at_0.5": float((~half[neg]).mean()),
        "ece": expected_calibration_error(y_test, s_test),
        "degenerate": bool(share <= 1 - DEGENERATE_SHARE or share >= DEGENERATE_SHARE),
        "threshold": thr,
    }


def per_run_table(cfg: ControlledConfig, data: Data, results: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """One row per seed × ratio × arm."""
    y_val = data.labels[data.split == "val"]
    y_test = data.labels[data.split == "test"]
    rows = []
    for seed, res in results.items():
        for ratio in cfg.ratios:
            for arm in cfg.arms:
                s = res["scores"][f"{ratio}|{arm}"]
                rows.append({"seed": seed, "ratio": ratio, "arm": arm,
                             **run_scores(y_val, s["val"], y_test, s["test"], cfg.target_specificity)})
    return pd.DataFrame(rows)


def cell_table(runs: pd.DataFrame, cfg: ControlledConfig) -> pd.DataFrame:
    """Mean and sample std over seeds per ratio × arm, plus the count of degenerate runs."""
    metrics = CELL_METRICS
    rows = []
    for ratio in cfg.ratios:
        for arm in cfg.arms:
            part = runs[(runs.ratio == ratio) & (runs.arm == arm)]
            row: dict[str, Any] = {"ratio": ratio, "arm": arm, "seeds": len(part),
                                   "degenerate": int(part.degenerate.sum())}
            for m in metrics:
                row[m] = float(part[m].mean())
                row[f"{m}_std"] = float(part[m].std(ddof=1)) if len(part) > 1 else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(cfg: ControlledConfig, data: Data, results: dict[int, dict[str, Any]],
                       runs: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean differences (arm − reference) in AUROC and sensitivity at 95 % specificity, with
    patient-bootstrap 95 % CIs and the number of seeds the arm wins."""
    test = data.split == "test"
    y = data.labels[test]
    resamples = bootstrap_indices(int(test.sum()), cfg.bootstrap, seed=0, groups=data.patients[test])
    pairs = [(a, REFERENCE_ARM) for a in cfg.arms if a != REFERENCE_ARM]
    pairs += [p for p in EXTRA_PAIRS if p[0] in cfg.arms and p[1] in cfg.arms]
    thresholds = runs.set_index(["seed", "ratio", "arm"])["threshold"]
    cache: dict[tuple, np.ndarray] = {}

    def boot(seed: int, ratio: str, arm: str) -> np.ndarray:
        key = (seed, ratio, arm)
        if key not in cache:
            s = results[seed]["scores"][f"{ratio}|{arm}"]["test"]
            thr = thresholds[key]
            values = np.empty((len(resamples), 2))
            for b, idx in enumerate(resamples):
                yb, sb = y[idx], s[idx]
                values[b] = rank_auroc(yb, sb), (sb[yb == 1] > thr).mean()
            cache[key] = values
        return cache[key]

    rows = []
    full = runs.set_index(["seed", "ratio", "arm"])
    seeds = list(results)
    # two-level bootstrap: resample b draws its own multiset of seeds beside its patient resample
    seed_draws = np.random.default_rng(1).integers(0, len(seeds), size=(len(resamples), len(seeds)))
    for ratio in cfg.ratios:
        for arm, ref in pairs:
            per_seed = np.stack([boot(s, ratio, arm) - boot(s, ratio, ref) for s in seeds])  # (S, B, 2)
            diffs = per_seed.mean(axis=0)
            two_level = per_seed[seed_draws, np.arange(len(resamples))[:, None]].mean(axis=1)  # (B, 2)
            row: dict[str, Any] = {"ratio": ratio, "arm": arm, "reference": ref}
            for j, m in enumerate(("auroc", "sens_at_spec")):
                point = np.array([full.loc[(s, ratio, arm), m] - full.loc[(s, ratio, ref), m] for s in seeds])
                lo, hi = np.nanquantile(diffs[:, j], [0.025, 0.975])
                s_lo, s_hi = seed_interval(point)
                t_lo, t_hi = np.nanquantile(two_level[:, j], [0.025, 0.975])
                row.update({f"d_{m}": float(np.mean(point)), f"d_{m}_lo": float(lo), f"d_{m}_hi": float(hi),
                            f"d_{m}_seed_lo": s_lo, f"d_{m}_seed_hi": s_hi,
                            f"d_{m}_2l_lo": float(t_lo), f"d_{m}_2l_hi": float(t_hi),
                            f"wins_{m}": int(sum(p > 0 for p in point))})
            rows.append(row)
    return pd.DataFrame(rows)


def seed_level_table(runs: pd.DataFrame, pairs: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Per ratio and pair: the seed mean of the paired full-test-set differences and its seed-level
    t-interval, from a ``runs.csv`` table alone (no scores needed). Default pairs: every arm vs the
    reference, then :data:`EXTRA_PAIRS`."""
    arms = list(dict.fromkeys(runs["arm"]))
    if pairs is None:
        pairs = [(a, REFERENCE_ARM) for a in arms if a != REFERENCE_ARM]
        pairs += [p for p in EXTRA_PAIRS if p[0] in arms and p[1] in arms]
    full = runs.set_index(["seed", "ratio", "arm"])
    seeds = sorted(set(runs["seed"]))
    rows = []
    for ratio in dict.fromkeys(runs["ratio"]):
        for arm, ref in pairs:
            row: dict[str, Any] = {"ratio": ratio, "arm": arm, "reference": ref}
            for m in ("auroc", "sens_at_spec"):
                point = np.array([full.loc[(s, ratio, arm), m] - full.loc[(s, ratio, ref), m] for s in seeds])
                lo, hi = seed_interval(point)
                row.update({f"d_{m}": float(point.mean()), f"d_{m}_seed_lo": lo, f"d_{m}_seed_hi": hi})
            rows.append(row)
    return pd.DataFrame(rows)


def seed_interval(differences: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Paired t-interval of the mean of per-seed differences (NaN with fewer than 2 seeds)."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f}" if not np.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def markdown(cells: pd.DataFrame, diffs: pd.DataFrame, cfg: ControlledConfig) -> str:
    """The two result tables as Markdown."""
    spec = f"{cfg.target_specificity:.0%}"
    lines = [f"| ratio | arm | AUROC | AUPRC | sens @ val {spec} spec | test spec there | sens @ 0.5 | "
             "spec @ 0.5 | ECE | degenerate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in cells.iterrows():
        vals = [_fmt(r[m], r[f"{m}_std"]) for m in CELL_METRICS]
        lines.append(f"| {r.ratio} | {r.arm} | " + " | ".join(vals) + f" | {r.degenerate}/{r.seeds} |")
    lines += ["", f"Paired differences: seed mean; 95 % intervals from the patient bootstrap (models fixed), "
              f"over the {len(cfg.seeds)} paired seeds (t) and two-level (seeds × patients); seeds won:", "",
              "| ratio | arm − reference | Δ AUROC | patients | seeds | two-level | wins | Δ sens @ spec | patients | "
              "seeds | two-level | wins |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ci(lo: float, hi: float) -> str:
        return f"[{lo:+.3f}, {hi:+.3f}]"

    for _, r in diffs.iterrows():
        cols = []
        for m in ("auroc", "sens_at_spec"):
            cols += [f"{r[f'd_{m}']:+.3f}", ci(r[f"d_{m}_lo"], r[f"d_{m}_hi"]),
                     ci(r[f"d_{m}_seed_lo"], r[f"d_{m}_seed_hi"]), ci(r[f"d_{m}_2l_lo"], r[f"d_{m}_2l_hi"]),
                     str(r[f"wins_{m}"])]
        lines.append(f"| {r.ratio} | {r.arm} − {r.reference} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def plot(cells: pd.DataFrame, diffs: pd.DataFrame, cfg: ControlledConfig, path: Path) -> Path:
    """AUROC, sensitivity at the validation 95 %-specificity threshold and at 0.5 against the ratio,
    and the paired AUROC differences against the reference with their bootstrap CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsi_cmaf.train.paper.report import ratio_minority_percent

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (("auroc", "test AUROC"), ("sens_at_spec", f"sensitivity @ val {cfg.target_specificity:.0%} spec"),
              ("sens_at_0.5", "sensitivity @ 0.5"))
    for ax, (metric, label) in zip(axes[:3], panels):
        for arm in cfg.arms:
            part = cells[cells.arm == arm]
            x = [ratio_minority_percent(r) for r in part.ratio]
            ax.errorbar(x, part[metric], yerr=part[f"{metric}_std"], marker="o", ms=4, capsize=3, lw=1.2,
                        label=arm, ls="--" if arm == REFERENCE_ARM else "-")
        ax.set_xscale("log")
        ax.set_xlabel("minority share of the training set (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    # Seed-to-seed spread (stage-1 features) hides paired effects; the last panel shows them.
    ax = axes[3]
    vs_ref = diffs[diffs.reference == REFERENCE_ARM]
    arms = [a for a in cfg.arms if a != REFERENCE_ARM]
    for k, ratio in enumerate(cfg.ratios):
        part = vs_ref[vs_ref.ratio == ratio].set_index("arm").reindex(arms)
        y = np.arange(len(arms)) + (k - (len(cfg.ratios) - 1) / 2) * 0.25
        err = np.vstack([part.d_auroc - part.d_auroc_lo, part.d_auroc_hi - part.d_auroc])
        ax.errorbar(part.d_auroc, y, xerr=np.clip(err, 0, None), fmt="o", ms=4, capsize=2, label=ratio)
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_yticks(np.arange(len(arms)), arms, fontsize=7)
    ax.set_xlabel(f"paired Δ AUROC vs {REFERENCE_ARM} (95 % CI)")
    ax.legend(fontsize=7, title="ratio", title_fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Controlled imbalance: {cfg.n_minority} training positives at every ratio, "
                 f"{len(cfg.seeds)} paired seeds (mean ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(cfg: ControlledConfig, data: Data, results: dict[int, dict[str, Any]], out: Path,
                 wall_seconds: float, run_provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write results.json, results.md, runs.csv and the figure into ``out``; return the summary.

    ``run_provenance``: that of the run whose stored scores are being re-reported
    (:func:`~wsi_cmaf.train.paper.controlled_scores.rederive`); this process's goes under ``rederived_by``.
    """
    import torch

    from wsi_cmaf.train.paper.provenance import provenance

    runs = per_run_table(cfg, data, results)
    cells = cell_table(runs, cfg)
    diffs = paired_differences(cfg, data, results, runs)
    runs.to_csv(out / "runs.csv", index=False)
    md = markdown(cells, diffs, cfg)
    counts = {str(s): r["train_counts"] for s, r in results.items()}
    split = {k: int((data.split == k).sum()) for k in ("train", "val", "test")}
    n_train = {r: sum(results[next(iter(results))]["train_counts"][r]) for r in cfg.ratios}
    steps = {r: cfg.fusion_steps(n) for r, n in n_train.items()}
    summary = {
        "provenance": run_provenance or provenance(),
        **({"rederived_by": provenance()} if run_provenance else {}),
        "command": "wsi-cmaf protocol imbalance-controlled",
        "budget": {"fusion_steps": steps, "batch_size": cfg.batch_size,
                   "passes": {r: round(steps[r] * min(cfg.batch_size, n) / n, 2) for r, n in n_train.items()}},
        "wall_seconds": wall_seconds,
        "seconds_per_seed": {str(s): r["seconds"] for s, r in results.items()},
        "machine": f"{platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "data": {"patches": split, "test_positive_share": float(data.labels[data.split == "test"].mean()),
                 "train_counts_per_seed": counts},
        "cells": cells.to_dict(orient="records"),
        "differences": diffs.to_dict(orient="records"),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float), encoding="utf-8")
    (out / "results.md").write_text(md, encoding="utf-8")
    plot(cells, diffs, cfg, out / "fig_imbalance_controlled.png")
    return summary
