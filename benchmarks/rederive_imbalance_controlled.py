"""Recompute the controlled imbalance experiment's tables and intervals from its committed scores.

Reads ``DIR/config.json`` and ``DIR/scores/`` (float16 logit margins of every run, labels and
patients of every patch), recomputes ``runs.csv``, ``results.md``, ``results.json`` and the figure
into a temporary folder (nothing is trained, no image is needed), and compares every number with the
committed ``results.json`` and ``runs.csv``. Offline; about a minute on 2 CPU cores (the bootstrap).

Usage::

    python benchmarks/rederive_imbalance_controlled.py [DIR]            # check (exit 1 on a mismatch)
    python benchmarks/rederive_imbalance_controlled.py [DIR] --write    # rewrite the tables in DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import pandas as pd

from wsi_cmaf.train.paper.controlled_scores import rederive

DEFAULT_DIR = Path(__file__).resolve().parent / "results" / "imbalance_controlled"


def _records_differ(old: list[dict], new: list[dict], tol: float) -> list[str]:
    problems = []
    if len(old) != len(new):
        return [f"{len(old)} rows committed, {len(new)} rederived"]
    for i, (a, b) in enumerate(zip(old, new)):
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            if isinstance(x, float) or isinstance(y, float):
                both_nan = x is not None and y is not None and math.isnan(float(x)) and math.isnan(float(y))
                if not both_nan and (x is None or y is None or abs(float(x) - float(y)) > tol):
                    problems.append(f"row {i} {key}: committed {x}, rederived {y}")
            elif x != y:
                problems.append(f"row {i} {key}: committed {x!r}, rederived {y!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Rederive, compare with the committed numbers, print what differs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--write", action="store_true", help="rewrite the tables and figure in DIR")
    parser.add_argument("--tol", type=float, default=1e-9, help="largest accepted absolute difference")
    args = parser.parse_args(argv)
    if not (args.dir / "scores").is_dir():
        # a run made before scores were stored: only its per-run table can be re-analysed
        from wsi_cmaf.train.paper.controlled_report import seed_level_table

        table = seed_level_table(pd.read_csv(args.dir / "runs.csv"))
        print(f"{args.dir} stores no scores: the patient bootstrap cannot be recomputed; seed-level "
              "intervals from runs.csv:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
        return 0
    committed = json.loads((args.dir / "results.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        summary = rederive(args.dir, Path(tmp))
        new_runs = pd.read_csv(Path(tmp) / "runs.csv")
        summary = json.loads((Path(tmp) / "results.json").read_text(encoding="utf-8"))
    old_runs = pd.read_csv(args.dir / "runs.csv")
    problems = []
    for part in ("cells", "differences"):
        problems += [f"{part}: {p}" for p in _records_differ(committed[part], summary[part], args.tol)]
    problems += [f"runs.csv: {p}" for p in _records_differ(old_runs.to_dict("records"),
                                                           new_runs.to_dict("records"), args.tol)]
    print(f"{args.dir}: {len(summary['cells'])} cells, {len(summary['differences'])} paired differences, "
          f"{len(new_runs)} runs rederived from {args.dir / 'scores'}")
    for p in problems[:40]:
        print("  MISMATCH", p)
    if args.write:
        rederive(args.dir)
        print(f"rewrote the tables in {args.dir}")
    print("all committed numbers rederived" if not problems else f"{len(problems)} mismatch(es)")
    return 1 if problems and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
