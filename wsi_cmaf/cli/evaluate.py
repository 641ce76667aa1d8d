"""``wsi-cmaf evaluate``: metrics of a trained model on a manifest (or patch store) split."""

from __future__ import annotations

import argparse

VERB = "evaluate"
HELP = "evaluate a trained model on a manifest: metrics.json with bootstrap CIs, confusion matrix, BreakHis breakdowns"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the verb's options."""
    p.add_argument("--checkpoint", required=True,
                   help="exported model folder (model.safetensors + config.json), a finished run folder "
                        "(its model/ is used) or a .safetensors file")
    p.add_argument("--manifest", required=True, help="manifest CSV (or packed patch store directory)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="rows to evaluate (default test; 'all' for zero-shot sets such as BreakHis)")
    p.add_argument("--out", default=None, help="output folder (default: eval_<manifest>_<split> beside the model)")
    p.add_argument("--target", default="auto", choices=["auto", "label", "subtype"],
                   help="label: benign/malignant; subtype: BreakHis 8-class (auto: subtype for >2-class models)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-images", default="decode", choices=["none", "exists", "decode"],
                   help="validate every image before evaluating (default: decode them, so corrupt files are "
                        "all listed up front)")
    p.add_argument("--stain-patches", type=int, default=64,
                   help="patches per patient for its Macenko fit (as data.stain_patches_per_patient in training)")
    p.add_argument("--compare", default=None, metavar="OTHER_CHECKPOINT",
                   help="a second checkpoint to compare on the same samples: adds the exact McNemar test of "
                        "the two models' predictions (discordant pairs, binomial p-value) to metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt(entry: object) -> str:
    if isinstance(entry, dict) and "value" in entry:
        v, lo, hi = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        return text + (f" (95% CI {lo:.3f}-{hi:.3f})" if isinstance(lo, float) and isinstance(hi, float) else "")
    return f"{entry:.3f}" if isinstance(entry, float) else str(entry)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the headline metrics and where the files are."""
    from wsi_cmaf.train.evaluate.checkpoint import evaluate_checkpoint

    report, out = evaluate_checkpoint(
        args.checkpoint, args.manifest, split=args.split, out_dir=args.out, target=args.target,
        device=args.device, batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed,
        check_images=args.check_images, stain_patches_per_patient=args.stain_patches,
        progress=not args.no_progress, compare=args.compare,
    )
    print(f"{report['n']} patches ({args.split}, target {report['target']}), model {report['model_dir']}")
    metrics = report["metrics"]
    for name, entry in metrics.items():
        if name.endswith("_ci") or name == "n" or (isinstance(entry, dict) and "value" not in entry):
            continue
        print(f"  {name:18s} {_fmt(metrics.get(f'{name}_ci', entry))}")
    for mag, m in (report.get("per_magnification") or {}).items():
        keys = ("balanced_accuracy", "auprc", "sensitivity", "specificity", "macro_f1")
        print(f"  magnification {mag}: " + ", ".join(f"{k} {_fmt(m[k])}" for k in keys if k in m))
    mc = report.get("mcnemar")
    if mc:
        print(f"  McNemar vs {mc['model_b']}: only this model right {mc['a_only_correct']}, only the other "
              f"{mc['b_only_correct']}; exact p = {mc['p_value']:.4g}")
    print(f"metrics: {out / 'metrics.json'}")
    for fig in report.get("figures", []):
        print(f"figure: {fig}")
    return 0
