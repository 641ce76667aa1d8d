"""The six GPU floors (issues 12 and 19) from one or several gpu_check.sh result folders.

    python benchmarks/gpu_floors.py /tmp/wsi_cmaf_gpu_check [SECOND_RUN ...]

Reads ``results.jsonl`` (one JSON line per measurement), ``stages.jsonl`` (started / finished /
skipped / timed out, with reasons) and ``table8_*/results.json``; a later folder's measurement of
a floor replaces an earlier one's (a ``STAGES=...`` rerun fills what the first run missed). Each
floor is printed as a value with ok / FAIL, as ``MISSING (<why>)`` when its stage ran but left no
measurement, or as ``SKIPPED (<why>)`` when its stage did not run. Nothing is estimated.

  (a) gpu_bf16_compiled_b256_ratio       CMAF-Net / ResNet-50 images/s, both compiled, bf16, batch 256 >= 1.2
  (b) gpu_b1_fps                         CMAF-Net batch 1 images/s (CUDA graphs or any setting) >= 134
  (c) loop_over_model_cmaf_net@224       streaming stage alone / model-only tiles/s, median of repeats >= 0.8
  (d) loop_over_decode_resnet18@64       loop tiles/s / warm decode bound at the loop's thread count >= 0.8
  (e) batch_over_bound                   slides/h / (fixed cost + tiles at min(model, decode) rate) >= 0.7
  (f) cuda_tests                         the GPU's test files pass on CUDA (trainer, AMP, SAM, runner...)

Exit status 0 always: the check reports, the person reading it decides.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

#: floor -> (stages that measure it, minimum)
FLOORS = {
    "gpu_bf16_compiled_b256_ratio": (("table8_compiled",), 1.2),
    "gpu_b1_fps": (("table8_graphs", "table8_eager"), 134.0),
    "loop_over_model_cmaf_net@224": (("loop_cmaf",), 0.8),
    "loop_over_decode_resnet18@64": (("loop_resnet", "decode"), 0.8),
    "batch_over_bound": (("batch",), 0.7),
    "cuda_tests": (("tests",), 1.0),
}


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip().startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off when its stage was killed
    return out


class Run:
    """What one result folder holds."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.results = _jsonl(folder / "results.jsonl")
        self.stages: dict[str, dict] = {}
        for ev in _jsonl(folder / "stages.jsonl"):
            self.stages[ev["stage"]] = ev  # the last event of a stage says how it ended
        pre = self.of("preflight")
        self.cuda = bool(pre and pre[-1].get("cuda"))
        self.device = (pre[-1].get("gpu") if pre and self.cuda else "cpu") if pre else "unknown"

    def of(self, bench: str, **match) -> list[dict]:
        return [r for r in self.results if r.get("bench") == bench and all(r.get(k) == v for k, v in match.items())]

    def why_absent(self, stages: tuple[str, ...]) -> tuple[str, str]:
        """("SKIPPED" | "MISSING", reason) for a floor whose stages left no measurement."""
        for name in stages:
            ev = self.stages.get(name)
            if ev is None:
                return "MISSING", f"stage {name} did not run in {self.folder}"
            if ev["event"] == "skipped":
                return "SKIPPED", f"stage {name}: {ev['reason']}"
            if ev["event"] == "timed_out":
                return "MISSING", f"stage {name} {ev['reason']}"
            if ev["event"] == "started":
                return "MISSING", f"stage {name} started and never finished (the check was cut off)"
            if ev.get("rc") not in (0, None):
                tail = ""
                log = self.folder / f"{name}.log"
                if log.exists():
                    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                    tail = f"; last line: {lines[-1][:200]}" if lines else ""
                return "MISSING", f"stage {name} failed (rc={ev['rc']}){tail}"
        return "MISSING", f"stages {', '.join(stages)} finished without a measurement"


def _table8(run: Run, stage: str) -> list[dict]:
    path = run.folder / stage / "results.json"
    return json.loads(path.read_text()).get("floors", []) if path.exists() else []


def measure(run: Run) -> dict[str, tuple[float, str] | None]:
    """floor -> (value, how it was measured) for what this run measured."""
    got: dict[str, tuple[float, str] | None] = dict.fromkeys(FLOORS)
    for stage in ("table8_compiled", "table8_graphs", "table8_eager"):
        for f in _table8(run, stage):
            name = f["floor"]
            if name in got and f.get("value") is not None and (got[name] is None or f["value"] > got[name][0]):
                got[name] = (f["value"], f"{stage}: {f.get('setting')}, {f.get('device')}, "
                                         f"compile={f.get('compile_mode')}, {f.get('note', '')}")
    loops = run.of("loop", model="cmaf_net@224")
    if loops:
        ratios = [r["loop_over_model"] for r in loops]
        got["loop_over_model_cmaf_net@224"] = (statistics.median(ratios), (
            f"{len(loops)} repeat(s), range {min(ratios)}-{max(ratios)}; loop "
            f"{[r['loop_tiles_per_s'] for r in loops]} vs model-only {[r['model_only_tiles_per_s'] for r in loops]}"
            f" tiles/s; whole analyze_slide {[r['e2e_s'] for r in loops]} s; {loops[0]['tissue_tiles']} tiles in "
            f"{loops[0]['blocks']} blocks; {loops[0]['device']} {loops[0]['precision']}"))
    rn = run.of("loop", model="resnet18@64")
    if rn:
        bound = next((d for d in run.of("decode_bound", slide=rn[0]["slide"], threads=rn[0]["reader_threads"])), None)
        if bound is not None:
            loop_tps = statistics.median(r["loop_tiles_per_s"] for r in rn)
            got["loop_over_decode_resnet18@64"] = (loop_tps / bound["tiles_per_s"], (
                f"loop {loop_tps:.1f} tiles/s ({rn[0]['blocks']} blocks of <= {rn[0]['block_tiles']}^2 tiles) vs "
                f"decode bound warm {bound['tiles_per_s']} / cold-reader {bound['cold_tiles_per_s']} tiles/s "
                f"({bound['blocks']} blocks) at {bound['threads']} threads; vs cold: "
                f"{loop_tps / bound['cold_tiles_per_s']:.3f}; model-only "
                f"{statistics.median(r['model_only_tiles_per_s'] for r in rn)}; {rn[0]['device']}"))
    batch = run.of("batch")
    if batch:
        b = batch[-1]
        got["batch_over_bound"] = (b["ratio_to_bound"], (
            f"{b['slides']} paths over {b['distinct_slides']} slides, {b['slides_per_hour']} slides/h vs bound "
            f"{b['bound_slides_per_hour']} ({b['bound_applies']}-bound: model {b['model_only_tiles_per_s']}, "
            f"decode {b['decode_tiles_per_s']} tiles/s) with a fixed cost of {b['fixed_s_per_slide']} s per slide "
            f"(one slide alone); {b['slides_in_flight']} in flight; {b['device']}"))
    tests = run.of("tests")
    if tests and run.cuda:
        summary = tests[-1]["summary"]
        failed = any(w in summary for w in (" failed", " error"))
        got["cuda_tests"] = (0.0 if failed or not summary else 1.0, summary or "no pytest summary line")
    return got


def main(folders: list[str]) -> int:
    runs = [Run(Path(f)) for f in folders]
    values: dict[str, tuple[float, str, Run] | None] = dict.fromkeys(FLOORS)
    for run in runs:  # later folders win
        for name, v in measure(run).items():
            if v is not None:
                values[name] = (*v, run)
    for run in runs:
        print(f"RUN {run.folder}: device {run.device}; stages " + ", ".join(
            f"{n}={ev['event']}" for n, ev in run.stages.items()))
        for r in run.of("first_block_compile"):
            print(f"INFO first block with compile={r['compile']}: {r['first_block_s']} s, then {r['second_block_s']} s "
                  f"(compile {r['compile_s']} s, shapes {r['shapes']}, cold Inductor cache)")
        for r in run.of("graph_threads"):
            print(f"INFO CUDA graphs from a second thread: {r.get('second_thread', r.get('skipped'))}")
        for r in run.of("jpeg_decode"):
            print(f"INFO nvJPEG {r['slide']}: " + ", ".join(f"{k}={r[k]}" for k in (
                "cpu_mpx_per_s", "gpu_mpx_per_s", "gpu_over_cpu", "max_abs_diff", "skipped") if k in r))
    last = runs[-1]
    for name, (stages, minimum) in FLOORS.items():
        v = values[name]
        if v is None:
            ran = [r for r in runs if any(s in r.stages for s in stages)]
            kind, why = (ran[-1] if ran else last).why_absent(stages)
            if not last.cuda and name == "cuda_tests" and last.of("tests"):
                kind, why = "SKIPPED", f"no CUDA; on the CPU: {last.of('tests')[-1].get('summary') or 'no summary'}"
            elif kind == "MISSING" and not last.cuda and name in ("gpu_bf16_compiled_b256_ratio", "gpu_b1_fps",
                                                                  "cuda_tests"):
                kind, why = "SKIPPED", f"no CUDA ({why})"
            print(f"FLOOR {name}: {kind} ({why}) [floor >= {minimum}]")
            continue
        value, how, run = v
        verdict = "ok" if value >= minimum else "FAIL"
        if not run.cuda:
            verdict += " (measured on the CPU: a rehearsal of the stage, not the GPU floor)"
        print(f"FLOOR {name}: {value:.3f} (floor >= {minimum}) {verdict} [{how}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["/tmp/wsi_cmaf_gpu_check"]))
