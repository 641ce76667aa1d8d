"""Run logs: one JSONL file with every row, one CSV per row kind, and monitoring statistics.

Rows are flat dicts. ``kind="step"`` rows carry every loss term, the learning rate, per-head
temperature ``tau/h``, attention entropy ``attn_entropy/h``, the gate mean, the MI proxies
(``raw/kl`` = KL upper bound of I(Z;X), ``raw/mi_st`` = HSIC dependence of Z_s and Z_t) and
per-class gradient norms; ``kind="epoch"`` rows carry the validation metrics.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu()
        return float(value) if value.numel() == 1 else [float(v) for v in value.flatten()]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class RunLogger:
    """Append-only JSONL + CSV logger. Safe to reopen on resume (appends; CSV header kept).

    The CSV of a kind gets its columns from the first row of that kind written in this
    process; later rows with new keys are written to the JSONL only (the CSV stays rectangular).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.directory / "log.jsonl"
        self._columns: dict[str, list[str]] = {}

    def log(self, kind: str, row: Mapping[str, Any]) -> None:
        """Append one row of ``kind`` ("step", "epoch", "test", ...)."""
        clean = {"kind": kind, **{k: _clean(v) for k, v in row.items()}}
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        flat = {k: v for k, v in clean.items() if not isinstance(v, (list, dict))}
        path = self.directory / f"{kind}.csv"
        cols = self._columns.get(kind)
        if cols is None:
            if path.is_file() and path.stat().st_size > 0:
                with open(path, newline="", encoding="utf-8") as fh:
                    cols = next(csv.reader(fh), None) or list(flat)
            else:
                cols = list(flat)
                with open(path, "w", newline="", encoding="utf-8") as fh:
                    csv.writer(fh).writerow(cols)
            self._columns[kind] = cols
        with open(path, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(["" if flat.get(c) is None else flat.get(c) for c in cols])

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop rows logged after the checkpointed ``epoch`` (they will be redone)."""
        if not self.jsonl.is_file():
            return
        kept = [line for line in self.jsonl.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("epoch", -1) <= epoch]
        self.jsonl.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        by_kind: dict[str, list[dict]] = {}
        for line in kept:
            row = json.loads(line)
            by_kind.setdefault(row["kind"], []).append(row)
        for path in self.directory.glob("*.csv"):
            path.unlink()
        self._columns.clear()
        for kind, rows in by_kind.items():
            for row in rows:
                self.log_csv_only(kind, row)

    def log_csv_only(self, kind: str, row: Mapping[str, Any]) -> None:
        """Rewrite helper for :meth:`truncate_after` (no JSONL write)."""
        flat = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
        path = self.directory / f"{kind}.csv"
        if kind not in self._columns:
            self._columns[kind] = list(flat)
            with open(path, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(self._columns[kind])
        with open(path, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(["" if flat.get(c) is None else flat.get(c) for c in self._columns[kind]])


def aux_statistics(aux: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Monitoring numbers from a CMAF-Net aux dict: per-head tau and attention entropy, gate mean, and
    with DFA the per-class bias ``dfa_bias/<c>`` (mean over heads) and class attention mass ``dfa_mass/<c>``."""
    out: dict[str, float] = {}
    if "tau" in aux:
        for h, v in enumerate(aux["tau"].detach().float().flatten().tolist()):
            out[f"tau/{h}"] = v
    if "attn_entropy" in aux:
        for h, v in enumerate(aux["attn_entropy"].detach().float().flatten().tolist()):
            out[f"attn_entropy/{h}"] = v
    if "gate" in aux:
        out["gate_mean"] = float(aux["gate"].detach().float().mean())
    # DFA: the learnt per-class bias (mean over heads) and the attention mass each class query puts
    # on the tokens, so a run log shows which classes the model learnt to treat as hard.
    if "dfa_bias" in aux:
        for c, v in enumerate(aux["dfa_bias"].detach().float().mean(dim=0).tolist()):
            out[f"dfa_bias/{c}"] = v
    if "dfa_class_mass" in aux:
        for c, v in enumerate(aux["dfa_class_mass"].detach().float().flatten().tolist()):
            out[f"dfa_mass/{c}"] = v
    return out


def per_class_grad_norms(
    per_sample_loss: torch.Tensor, target: torch.Tensor, params: Sequence[nn.Parameter], num_classes: int
) -> dict[str, float]:
    """L2 norm of the gradient of each class's share of the batch loss w.r.t. ``params``.

    The share of class c is ``sum_{i: y_i = c} loss_i / B``; these shares sum to the batch mean,
    so the norms show how much each class pulls on the weights (the imbalance diagnostic of
    Sec. 5). Only the classifier head is used as ``params`` to keep it cheap.
    """
    out: dict[str, float] = {}
    params = [p for p in params if p.requires_grad]
    if not params:
        return out
    b = max(int(target.numel()), 1)
    for c in range(num_classes):
        mask = target == c
        if not bool(mask.any()):
            continue
        grads = torch.autograd.grad(per_sample_loss[mask].sum() / b, params, retain_graph=True,
                                    allow_unused=True)
        sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
        out[f"grad_norm/class{c}"] = math.sqrt(sq)
    return out


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of a ``log.jsonl`` (optionally one kind)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if kind is None or row.get("kind") == kind:
                rows.append(row)
    return rows
