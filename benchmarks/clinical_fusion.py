"""Clinical fusion on controlled synthetic patients (issue 17 item 6).

    .venv/bin/python benchmarks/clinical_fusion.py            # ~5 min on 2 CPU cores

What runs:

1. Tile bank (real engine): 3 synthetic slides with tumour (9600 x 7200 px at 0.5 µm/px) go
   through ``analyze_slide(..., embeddings=True)`` with the fixed, seeded, untrained
   ``TinyTileEncoder`` (D = 32); every tissue tile's embedding is marked tumour/normal from the
   slides' ground-truth mask.
2. Patients (resampled from the bank): label ~ Bernoulli(0.5); tumour burden ~ Beta, mean 0.05
   (label 0) or 0.15 (label 1); a bag of 40-120 tiles with that share of tumour tiles. Clinical
   table (declared schema): tumour size and grade depend on the label (strength 1.0), ER status
   and age are noise. Image and clinical signal are independent given the label.
3. Per seed (paired: every model sees the same cohort and the same initial seed): image-only MIL,
   clinical-only MLP, concatenation, cross-attention fusion; same protocol (40 epochs, AdamW).
   240 training patients, 400 test patients; AUROC on the test patients, fusion minus each
   baseline with a paired bootstrap CI (1000 resamples of test patients). Then clinical data are
   removed for 0 %, 50 %, 100 % of the test patients (whole modality, at random) for fusion and
   concatenation. Control: clinical strength 0 (clinical variables carry no signal).

Writes ``results.json`` and ``figure.png`` to --results (default benchmarks/results/clinical_fusion).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi_cmaf.slidelevel.clinical import ClinicalEncoder, ClinicalSchema  # noqa: E402
from wsi_cmaf.slidelevel.data import PatientData  # noqa: E402
from wsi_cmaf.slidelevel.synthetic_patients import clinical_schema_dict, make_cohort, tile_bank  # noqa: E402
from wsi_cmaf.slidelevel.train import SlideTrainConfig, fit_slide_model, predict_patients  # noqa: E402

logger = logging.getLogger("clinical_fusion")
KINDS = ("image", "clinical", "concat", "fusion")
MISSING = (0.0, 0.5, 1.0)


def _auroc(y, p) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def paired_bootstrap(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, n_boot: int, seed: int) -> dict:
    """AUROC(a) - AUROC(b) on the same patients, with a percentile CI over resampled patients."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        diffs.append(_auroc(y[i], p_a[i]) - _auroc(y[i], p_b[i]))
    d = np.asarray(diffs)
    return {"diff": _auroc(y, p_a) - _auroc(y, p_b),
            "ci95": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))],
            "p_le_0": float((d <= 0).mean())}


def _data(cohort, encoder, split: str) -> PatientData:
    x, present = encoder.transform(cohort.clinical)
    return PatientData(list(cohort.clinical["patient"]), cohort.bags, cohort.labels, [split] * len(cohort.labels),
                       x, present)


def run_seed(bank, seed: int, args, cfg: SlideTrainConfig, strength: float, image_model=None) -> tuple[dict, object]:
    """Train the four kinds on one paired cohort; AUROCs, bootstrap differences, missingness curve."""
    train = make_cohort(bank, args.n_train, seed=1000 + seed, image_strength=args.image_strength,
                        clinical_strength=strength)
    test = make_cohort(bank, args.n_test, seed=2000 + seed, image_strength=args.image_strength,
                       clinical_strength=strength)
    enc = ClinicalEncoder(ClinicalSchema.from_dict(clinical_schema_dict())).fit(train.clinical)
    tr, te = _data(train, enc, "train"), _data(test, enc, "test")
    groups = [(g.start, g.stop) for _, g in enc.groups]
    cfg_seed = SlideTrainConfig(**{**cfg.__dict__, "seed": seed})
    probs, models = {}, {}
    for kind in KINDS:
        if kind == "image" and image_model is not None:  # identical bags and seed: the same model
            models[kind] = image_model
        else:
            models[kind] = fit_slide_model(kind, tr, cfg_seed, groups if kind != "image" else None)
        probs[kind] = predict_patients(models[kind], te)["prob"]
    y = te.labels
    out = {"seed": seed, "auroc": {k: _auroc(y, probs[k]) for k in KINDS},
           "fusion_minus": {k: paired_bootstrap(y, probs["fusion"], probs[k], args.n_boot, seed)
                            for k in ("image", "clinical", "concat")},
           "missing": {}}
    rng = np.random.default_rng(3000 + seed)
    u = rng.random(len(y))  # one draw per patient: 50 % missing is a subset of 100 %
    for frac in MISSING:
        present = u >= frac
        row = {}
        for kind in ("fusion", "concat"):
            row[kind] = _auroc(y, predict_patients(models[kind], te, present=present)["prob"])
        out["missing"][f"{int(frac * 100)}%"] = row
    return out, models["image"]


def summarise(rows: list[dict]) -> dict:
    """Mean and SD over seeds, and how many seeds fusion won."""
    def ms(v):
        v = np.asarray(v, float)
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

    s = {"auroc": {k: ms([r["auroc"][k] for r in rows]) for k in KINDS},
         "fusion_minus": {k: {**ms([r["fusion_minus"][k]["diff"] for r in rows]),
                              "seeds_fusion_better": int(sum(r["fusion_minus"][k]["diff"] > 0 for r in rows)),
                              "seeds_ci_above_0": int(sum(r["fusion_minus"][k]["ci95"][0] > 0 for r in rows))}
                          for k in ("image", "clinical", "concat")},
         "missing": {m: {k: ms([r["missing"][m][k] for r in rows]) for k in ("fusion", "concat")}
                     for m in rows[0]["missing"]}}
    s["missing_image_only_reference"] = s["auroc"]["image"]
    return s


def figure(results: dict, path: Path) -> None:
    """Left: AUROC per model, one line per seed (paired). Right: AUROC vs clinical missingness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = results["settings"][results["main_setting"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for r in main["per_seed"]:
        ax.plot(range(len(KINDS)), [r["auroc"][k] for k in KINDS], "-o", color="0.6", lw=1, ms=3)
    ax.plot(range(len(KINDS)), [main["summary"]["auroc"][k]["mean"] for k in KINDS], "-o", color="C3", lw=2,
            label="mean over seeds")
    ax.set_xticks(range(len(KINDS)), ["image-only", "clinical-only", "concat", "fusion"])
    ax.set_ylabel("test AUROC")
    ax.set_title(f"paired seeds (n={len(main['per_seed'])}), clinical strength {results['main_setting']}")
    ax.legend(loc="lower right")
    ax = axes[1]
    xs = [0, 50, 100]
    for kind, colour in (("fusion", "C3"), ("concat", "C0")):
        m = [main["summary"]["missing"][f"{x}%"][kind]["mean"] for x in xs]
        sd = [main["summary"]["missing"][f"{x}%"][kind]["sd"] for x in xs]
        ax.errorbar(xs, m, yerr=sd, marker="o", capsize=3, color=colour, label=kind)
    img = main["summary"]["auroc"]["image"]
    ax.axhline(img["mean"], color="k", ls="--", lw=1, label="image-only model")
    ax.axhspan(img["mean"] - img["sd"], img["mean"] + img["sd"], color="k", alpha=0.08)
    ax.set_xlabel("test patients without clinical data (%)")
    ax.set_ylabel("test AUROC")
    ax.set_title("missing clinical data at inference")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n-train", type=int, default=240)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--image-strength", type=float, default=0.10)
    p.add_argument("--strengths", default="1.0,0.0", help="clinical strengths (the first is the main setting)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--work", default=None, help="cache of the tile bank (default: a temporary folder)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "clinical_fusion"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        bank = tile_bank(work)
        t_bank = time.perf_counter() - t0
        logger.info("tile bank: %d normal, %d tumour tiles (%.0fs)", len(bank.normal), len(bank.tumour), t_bank)
        cfg = SlideTrainConfig(epochs=args.epochs)
        settings, image_models = {}, {}
        for strength in (float(s) for s in args.strengths.split(",")):
            rows = []
            for seed in range(args.seeds):
                row, image_models[seed] = run_seed(bank, seed, args, cfg, strength, image_models.get(seed))
                rows.append(row)
                logger.info("strength %.1f seed %d: %s", strength, seed,
                            {k: round(v, 3) for k, v in row["auroc"].items()})
            settings[str(strength)] = {"per_seed": rows, "summary": summarise(rows)}
    results = {
        "command": "python benchmarks/clinical_fusion.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "embeddings": "real engine: analyze_slide(embeddings=True) with the fixed seeded TinyTileEncoder (D=32) on "
                      "3 synthetic slides (9600x7200 px, 0.5 um/px, seeds 100-102); patients resample these tiles",
        "bank": {"normal_tiles": int(len(bank.normal)), "tumour_tiles": int(len(bank.tumour))},
        "cohort": {"n_train": args.n_train, "n_test": args.n_test, "image_strength": args.image_strength,
                   "burden_means": [0.05, 0.05 + args.image_strength], "tiles_per_patient": [40, 120],
                   "missing": "whole clinical modality removed for a random share of test patients"},
        "protocol": {**cfg.__dict__, "seeds": list(range(args.seeds)), "n_boot": args.n_boot},
        "main_setting": str(float(args.strengths.split(",")[0])),
        "settings": settings,
        "seconds": {"bank": round(t_bank, 1), "total": round(time.perf_counter() - t0, 1)},
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figure(results, out / "figure.png")
    main_s = settings[results["main_setting"]]["summary"]
    print(json.dumps({"auroc": main_s["auroc"], "fusion_minus": main_s["fusion_minus"], "missing": main_s["missing"]},
                     indent=1))
    print(f"total {results['seconds']['total']} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
