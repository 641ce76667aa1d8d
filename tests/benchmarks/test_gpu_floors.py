"""benchmarks/gpu_floors.py: every floor is printed, as a value or with the reason it is absent,
from what the stages of gpu_check.sh wrote (numbers below are worked out by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _write(folder: Path, results: list[dict], stages: list[dict], table8: dict[str, list[dict]] | None = None):
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results) + '{"bench": "loop", cut')
    (folder / "stages.jsonl").write_text("".join(json.dumps({"reason": "", "rc": None, **s}) + "\n" for s in stages))
    for stage, floors in (table8 or {}).items():
        (folder / stage).mkdir()
        (folder / stage / "results.json").write_text(json.dumps({"floors": floors}))


def _floors(*folders: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_floors.py"), *map(str, folders)],
                         capture_output=True, text=True, check=True).stdout
    return {ln.split(":", 1)[0].removeprefix("FLOOR "): ln.split(":", 1)[1].strip()
            for ln in out.splitlines() if ln.startswith("FLOOR ")}


def _loop(model: str, ratio: float, loop: float, **kw) -> dict:
    return {"bench": "loop", "model": model, "loop_over_model": ratio, "loop_tiles_per_s": loop,
            "model_only_tiles_per_s": loop / ratio, "e2e_s": 10.0, "tissue_tiles": 3655, "blocks": 96,
            "block_tiles": 8, "device": "cuda", "precision": "bf16", "slide": "s.tiff", "reader_threads": 8, **kw}


def test_values_and_reasons_for_all_six_floors(tmp_path):
    first = tmp_path / "first"
    _write(first, [
        {"bench": "preflight", "cuda": True, "gpu": "NVIDIA H200"},
        _loop("cmaf_net@224", 0.70, 700.0), _loop("cmaf_net@224", 0.90, 900.0), _loop("cmaf_net@224", 0.85, 850.0),
        _loop("resnet18@64", 0.5, 9000.0), _loop("resnet18@64", 0.5, 8000.0), _loop("resnet18@64", 0.5, 10000.0),
        {"bench": "decode_bound", "slide": "s.tiff", "threads": 8, "tiles_per_s": 10000.0,
         "cold_tiles_per_s": 5000.0, "blocks": 96},
        {"bench": "decode_bound", "slide": "s.tiff", "threads": 2, "tiles_per_s": 1.0, "cold_tiles_per_s": 1.0,
         "blocks": 96},
        {"bench": "tests", "summary": "80 passed, 3 skipped in 101.2s"},
    ], [
        {"stage": "table8_compiled", "event": "timed_out", "reason": "killed after its 70 s slot", "rc": 124},
        {"stage": "table8_graphs", "event": "finished", "rc": 0},
        {"stage": "loop_cmaf", "event": "finished", "rc": 0},
        {"stage": "batch", "event": "finished", "rc": 1},
        {"stage": "tests", "event": "finished", "rc": 0},
    ], {"table8_graphs": [{"floor": "gpu_b1_fps", "value": 150.5, "minimum": 134.0, "setting": "bf16 b1"}]})
    (first / "batch.log").write_text("...\nValueError: something broke\n")
    f = _floors(first)
    assert set(f) == {"gpu_bf16_compiled_b256_ratio", "gpu_b1_fps", "loop_over_model_cmaf_net@224",
                      "loop_over_decode_resnet18@64", "batch_over_bound", "cuda_tests"}
    assert f["gpu_bf16_compiled_b256_ratio"].startswith("MISSING (stage table8_compiled killed after its 70 s slot)")
    assert f["gpu_b1_fps"].startswith("150.500 (floor >= 134.0) ok")
    assert f["loop_over_model_cmaf_net@224"].startswith("0.850 (floor >= 0.8) ok")  # median of 0.70, 0.85, 0.90
    # median loop 9000 tiles/s over the 8-thread bound of 10000 (the 2-thread line is not the loop's)
    assert f["loop_over_decode_resnet18@64"].startswith("0.900 (floor >= 0.8) ok")
    assert "cold-reader 5000.0" in f["loop_over_decode_resnet18@64"] and "vs cold: 1.800" in f[
        "loop_over_decode_resnet18@64"]
    assert f["batch_over_bound"].startswith("MISSING (stage batch failed (rc=1); last line: ValueError: something")
    assert f["cuda_tests"].startswith("1.000 (floor >= 1.0) ok")

    # a second call that ran only the batch stage fills that floor; the rest stays from the first
    second = tmp_path / "second"
    _write(second, [
        {"bench": "preflight", "cuda": True, "gpu": "NVIDIA H200"},
        {"bench": "batch", "slides": 20, "distinct_slides": 4, "slides_per_hour": 630.0,
         "bound_slides_per_hour": 1000.0,
         "ratio_to_bound": 0.63, "bound_applies": "model", "model_only_tiles_per_s": 3000.0,
         "decode_tiles_per_s": 9000.0, "fixed_s_per_slide": 2.5, "slides_in_flight": 4, "device": "cuda"},
    ], [{"stage": "batch", "event": "finished", "rc": 0}])
    f = _floors(first, second)
    assert f["batch_over_bound"].startswith("0.630 (floor >= 0.7) FAIL") and "fixed cost of 2.5 s" in f[
        "batch_over_bound"]
    assert f["loop_over_model_cmaf_net@224"].startswith("0.850")


def test_a_cpu_rehearsal_reports_gpu_floors_as_skipped(tmp_path):
    run = tmp_path / "cpu"
    _write(run, [{"bench": "preflight", "cuda": False}, {"bench": "tests", "summary": "10 passed, 4 skipped"}], [
        {"stage": "warm_compile", "event": "skipped", "reason": "no CUDA"},
        {"stage": "table8_compiled", "event": "skipped", "reason": "no CUDA"},
        {"stage": "table8_graphs", "event": "skipped", "reason": "no CUDA"},
        {"stage": "loop_cmaf", "event": "skipped", "reason": "missing dependency: shapely (see preflight)"},
        {"stage": "tests", "event": "finished", "rc": 0},
    ])
    f = _floors(run)
    assert f["gpu_bf16_compiled_b256_ratio"].startswith("SKIPPED (stage table8_compiled: no CUDA)")
    assert f["gpu_b1_fps"].startswith("SKIPPED (stage table8_graphs: no CUDA)")
    assert f["loop_over_model_cmaf_net@224"].startswith("SKIPPED (stage loop_cmaf: missing dependency: shapely")
    assert f["loop_over_decode_resnet18@64"].startswith("MISSING (stage loop_resnet did not run")
    assert f["cuda_tests"].startswith("SKIPPED (no CUDA")
