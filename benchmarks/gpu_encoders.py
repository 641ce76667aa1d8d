"""GPU stage of the device check for the foundation-model encoders (called by gpu_check.sh).

    python benchmarks/gpu_encoders.py --out "$OUT" [--budget 240] [--quick]

Runs ``bench_encoders.py --device cuda`` for a ViT-B (Phikon), a ViT-L (UNI), a ViT-H (Virchow2)
and a ViT-g (H-optimus-0) at their native 224 px, bf16, batch 256, eager and with
``torch.compile``, sampling GPU utilisation with nvidia-smi, each step under its share of
``--budget`` seconds. Writes every JSON line to ``<out>/encoders_gpu.jsonl`` and prints a table
(encoder, compile, e2e tiles/s, model-only tiles/s, ratio, GPU utilisation). A step that times
out or fails is reported as such; nothing is estimated. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = [("phikon", "off"), ("phikon", "on"), ("uni", "off"), ("uni", "on"), ("virchow2", "off"),
         ("h-optimus-0", "off")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for all steps together")
    ap.add_argument("--quick", action="store_true", help="a small slide and two steps (smoke run)")
    args = ap.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "encoders_gpu.jsonl"
    if not torch.cuda.is_available():
        print("gpu_encoders: no CUDA device; skipped")
        return 0
    steps = STEPS[:2] if args.quick else STEPS
    size = ["6000", "6000"] if args.quick else ["30000", "30000"]
    t_end = time.monotonic() + args.budget
    rows = []
    for i, (name, comp) in enumerate(steps):
        left = t_end - time.monotonic()
        share = left / (len(steps) - i)
        if share < 20:
            rows.append({"encoder": name, "compile": comp, "status": "not run (budget spent)"})
            continue
        cmd = [sys.executable, str(HERE / "bench_encoders.py"), "--device", "cuda", "--encoders", name,
               "--size", *size, "--repeats", "1", "--batch-size", "256", "--precision", "bf16", "--compile", comp,
               "--reader-threads", "8", "--block-tiles", "32", "--gpu-util", "--workdir", str(out / "encoders_work")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=share)
        except subprocess.TimeoutExpired:
            rows.append({"encoder": name, "compile": comp, "status": f"timed out after {share:.0f}s"})
            continue
        got = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        with open(log, "a", encoding="utf-8") as fh:
            for g in got:
                fh.write(json.dumps(g) + "\n")
        meas = [g for g in got if "ratio" in g]
        if proc.returncode or not meas:
            rows.append({"encoder": name, "compile": comp, "status": f"failed (rc {proc.returncode}): "
                                                                     f"{proc.stderr.strip()[-300:]}"})
            continue
        rows.append({**meas[-1], "status": "ok"})
    print(f"{'encoder':<13} {'compile':<7} {'e2e t/s':>9} {'model t/s':>10} {'ratio':>6} {'GPU util %':>10}  status")
    for r in rows:
        util = (r.get("gpu_util") or {}).get("mean", "")
        print(f"{r['encoder']:<13} {r['compile']:<7} {r.get('e2e_tiles_s', ''):>9} "
              f"{r.get('model_only_tiles_s', ''):>10} "
              f"{r.get('ratio', ''):>6} {util:>10}  {r['status']}")
    shutil_rm(out / "encoders_work")
    return 0


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
