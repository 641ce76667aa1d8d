"""``wsi-cmaf train``: run (or resume) a training run described by a YAML/JSON config file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

VERB = "train"
HELP = "train CMAF-Net (three stages) or a timm baseline from a YAML/JSON config; export the best model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("--config", required=True, help="training config (.yaml/.yml/.json); see examples/train_*.yaml")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in output_dir from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.sam=false --set stages.epochs=[3,4,3] "
                        "(VALUE is parsed as YAML; repeatable; relative paths resolve against the config's folder)")
    p.add_argument("--output-dir", default=None,
                   help="run folder (overrides output_dir; relative to the current folder)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (overrides device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    import yaml

    from wsi_cmaf.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
        parts = [k.strip() for k in key.split(".")]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with an earlier --set of {part!r}")
        node[parts[-1]] = value
    return out


def _fmt(entry: Any) -> str:
    if isinstance(entry, dict) and "value" in entry:
        lo, hi = entry.get("ci_low"), entry.get("ci_high")
        ci = f" (95% CI {lo:.3f}-{hi:.3f})" if isinstance(lo, float) and isinstance(hi, float) else ""
        return f"{entry['value']:.3f}{ci}" if isinstance(entry["value"], float) else f"{entry['value']}{ci}"
    return f"{entry:.3f}" if isinstance(entry, float) else str(entry)


def summary_lines(result: Any) -> list[str]:
    """Human-readable summary of a :class:`~wsi_cmaf.train.engine.trainer.TrainResult`."""
    lines = [f"run folder: {result.output_dir}", f"best epoch: {result.best_epoch} "
             f"(val AUPRC {_fmt(result.best_val.get('auprc'))}, val balanced accuracy "
             f"{_fmt(result.best_val.get('balanced_accuracy'))})",
             f"test ({result.test_metrics.get('n')} patches, patient-level bootstrap):"]
    for name, entry in result.test_metrics.get("metrics", {}).items():
        if name.endswith("_ci") or (isinstance(entry, dict) and "value" not in entry):
            continue
        ci = result.test_metrics["metrics"].get(f"{name}_ci")
        lines.append(f"  {name:18s} {_fmt(ci if ci is not None else entry)}")
    lines += [f"model: {result.model_dir}", f"logs: {result.val_history_path}", f"time: {result.seconds:.0f} s"]
    return lines


def run(args: argparse.Namespace) -> int:
    """Train and print the summary."""
    from wsi_cmaf.train.config import TrainConfig, merge_dicts
    from wsi_cmaf.train.engine.trainer import train

    overrides = parse_overrides(args.overrides)
    if args.output_dir:
        overrides = merge_dicts(overrides, {"output_dir": str(Path(args.output_dir).resolve())})
    if args.device:
        overrides = merge_dicts(overrides, {"device": args.device})
    config = TrainConfig.from_file(args.config, overrides)
    result = train(config, resume=args.resume, progress=False if args.no_progress else None)
    print("\n".join(summary_lines(result)))
    return 0
