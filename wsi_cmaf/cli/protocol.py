"""``wsi-cmaf protocol``: run one of the paper's experiment protocols and print its table."""

from __future__ import annotations

import argparse
from pathlib import Path

VERB = "protocol"
HELP = ("run a paper protocol (table1, imbalance, ablations, temperature, efficiency, fig4) or the controlled "
        "imbalance experiment (imbalance-controlled) and write its tables")

_NAMES = ("table1", "imbalance", "ablations", "temperature", "efficiency", "fig4", "imbalance-controlled")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("name", help=f"protocol: one of {', '.join(_NAMES)}")
    p.add_argument("--base", default=None,
                   help="base training config (YAML/JSON: data source, model, stages...); required except "
                        "for efficiency and for fig4 with --log")
    p.add_argument("--out", required=True, help="protocol folder (one subfolder per run; rerun to resume)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds (default 0 1 2 3 4: the paper's five runs)")
    p.add_argument("--ratios", nargs="+", default=None, help="imbalance: training ratios (default 70:30 95:5 99:1)")
    p.add_argument("--losses", nargs="+", default=None,
                   help="imbalance: losses (default cross_entropy focal acbfl); imbalance-controlled: arms "
                        "(default all: ce ce_sqrt ce_inverse balanced_softmax focal acbfl acbfl_smooth acbfl_dfa)")
    p.add_argument("--models", nargs="+", default=None,
                   help="table1: timm baselines (names without 'timm:'); efficiency: registry names "
                        "(default cmaf_net + the seven timm baselines)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base-config value, dotted keys, YAML values "
                        "(e.g. --set stages.epochs=[2,2,2] --set data.max_steps_per_epoch=20); repeatable")
    p.add_argument("--log", default=None,
                   help="fig4: plot this existing run log (log.jsonl or its folder) instead of training")
    p.add_argument("--batch-size", type=int, default=None,
                   help="efficiency: throughput batch (default 256 on CUDA, 32 on CPU)")
    p.add_argument("--latency-batch", type=int, default=None, help="efficiency: latency batch (default 1)")
    p.add_argument("--input-size", type=int, default=224, help="efficiency: input side length")
    p.add_argument("--precisions", nargs="+", default=None,
                   help="efficiency: fp32 bf16 fp16 (default fp32 + bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", nargs="+", default=None,
                   help="efficiency: compile settings to compare, e.g. off auto on reduce-overhead "
                        "(default off + auto on CUDA, off on CPU)")
    p.add_argument("--device", default=None, help="efficiency: auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--quick", action="store_true",
                   help="efficiency: only CMAF-Net and ResNet-50 at the settings the floors need")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the protocol and print its Markdown table."""
    from wsi_cmaf.errors import ConfigError
    from wsi_cmaf.train.paper import protocols as P

    if args.name not in _NAMES:
        raise ConfigError(f"unknown protocol {args.name!r}; choose one of {', '.join(_NAMES)}")
    out = Path(args.out)
    progress = not args.no_progress
    if args.name == "imbalance-controlled":
        return _run_controlled(args, out, progress)
    base, base_dir = P.load_base(args.base, args.sets)
    if args.name == "efficiency":
        from wsi_cmaf.train.paper.efficiency import efficiency_from_base, run_efficiency

        cfg = efficiency_from_base(base, args.models, batch_size=args.batch_size, input_size=args.input_size,
                                   latency_batch=args.latency_batch, precisions=args.precisions,
                                   compile=args.compile, device=args.device, quick=args.quick or None)
        _, md = run_efficiency(cfg, out, progress=progress)
        print(md)
        print(f"machine-readable: {out / 'results.json'} (rows and floors)")
        return 0
    if args.name == "fig4" and args.log:
        from wsi_cmaf.train.paper.report import plot_tau_entropy

        out.mkdir(parents=True, exist_ok=True)
        print(plot_tau_entropy(args.log, out / "fig4_tau_entropy.png", title=str(args.log)))
        return 0
    if args.base is None:
        raise ConfigError(f"protocol {args.name} trains models: give --base CONFIG (data source, model, stages)")
    kw = {}
    if args.seeds is not None:
        kw["seeds"] = args.seeds
    if args.ratios is not None:
        kw["ratios"] = args.ratios
    if args.losses is not None:
        kw["losses"] = args.losses
    if args.models is not None:
        kw["baselines"] = [m.removeprefix("timm:") for m in args.models]
    protocol = P.build_protocol(args.name, base, **kw)
    P.run_protocol(protocol, base, out, base_dir=base_dir, progress=progress)
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


def _run_controlled(args: argparse.Namespace, out: Path, progress: bool) -> int:
    """The controlled imbalance experiment: its settings come from --set (flat ControlledConfig fields)."""
    import dataclasses

    from wsi_cmaf.errors import ConfigError
    from wsi_cmaf.train.paper import protocols as P
    from wsi_cmaf.train.paper.controlled import ControlledConfig, run_controlled

    if args.base is not None:
        raise ConfigError("imbalance-controlled builds its own data and model; use --set FIELD=VALUE, not --base")
    fields = {f.name for f in dataclasses.fields(ControlledConfig)}
    overrides = P.parse_set(args.sets)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown imbalance-controlled setting(s) {unknown}; known: {sorted(fields)}")
    for flag, name in (("seeds", "seeds"), ("ratios", "ratios"), ("losses", "arms")):
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag)
    for name in ("seeds", "ratios", "arms", "split_patients"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    run_controlled(ControlledConfig(**overrides), out, progress=progress)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"machine-readable: {out / 'results.json'}; figure: {out / 'fig_imbalance_controlled.png'}")
    return 0
