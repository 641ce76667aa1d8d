"""Reruns do only what can change: permanent input errors are reported, not retried."""

from __future__ import annotations

import time

import pytest

import wsi_cmaf.cluster.batch as batch_mod
from tests.helpers.batch import status_rows
from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cluster import analyze_slides
from wsi_cmaf.cluster.plan import failed_for_good, is_permanent_error
from wsi_cmaf.cluster.status import StatusTable
from wsi_cmaf.infer import InferenceConfig
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.slide.synthetic import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, reader_threads=1, overlay=False, geojson=False)


@pytest.fixture(scope="module")
def client():
    from wsi_cmaf.cluster.engine import connect

    with connect(cluster="local", workers=1) as c:
        yield c


def _forbid(monkeypatch) -> None:
    def forbidden(*a, **k):
        raise AssertionError("this rerun must not start a cluster")

    monkeypatch.setattr(batch_mod, "connect", forbidden)


def test_permanent_failure_is_reported_not_retried_until_the_file_changes(client, tmp_path, monkeypatch):
    good = write_synthetic_slide(tmp_path / "good.tiff", 2400, 2000, 0.5, seed=1).path
    truncated = tmp_path / "cut.tiff"
    truncated.write_bytes(good.read_bytes()[:200])  # cut inside its header: unreadable
    missing = tmp_path / "gone.svs"
    model = resolve_model(DarknessClassifier(), tiny_config())
    out = tmp_path / "out"
    first = analyze_slides([good, truncated, missing], out, model=model, client=client, config=CFG, progress=False)
    rows = {r["key"]: r for r in first.rows}
    assert rows["good"]["status"] == "done"
    assert rows["cut"]["status"] == "failed" and is_permanent_error(rows["cut"]["error_type"]), rows["cut"]
    assert rows["gone"]["status"] == "failed" and rows["gone"]["error_type"] == "SlideNotFoundError"
    assert rows["gone"]["fingerprint"] == "missing"

    _forbid(monkeypatch)  # only finished and permanently failed slides are left: no cluster
    t0 = time.perf_counter()
    again = analyze_slides([good, truncated, missing], out, model=model, config=CFG, progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert again.skipped == 3 and again.counts == {"done": 1, "failed": 2}
    assert {r["key"]: r["error"] for r in again.rows} == {k: r["error"] for k, r in rows.items()}  # as recorded

    # --retry-failed retries them, and so does a changed file
    with pytest.raises(AssertionError, match="must not start"):
        analyze_slides([good, truncated, missing], out, model=model, config=CFG, progress=False, retry_failed=True)
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(AssertionError, match="must not start"):
        analyze_slides([good, truncated], out, model=model, config=CFG, progress=False)


def test_transient_failures_are_still_retried(client, tmp_path, monkeypatch):
    slide = write_synthetic_slide(tmp_path / "t.tiff", 2400, 2000, 0.5, seed=2).path
    model = resolve_model(DarknessClassifier(), tiny_config())
    out = tmp_path / "out"
    analyze_slides([slide], out, model=model, client=client, config=CFG, progress=False)
    table = StatusTable(out / "status.csv")
    row = table.get("t")
    for error_type in ("KilledWorker", "OutputWriteError", "StoreLockedError", "ModelError", ""):
        table.update("t", status="failed", error_type=error_type, error="x")
        assert not failed_for_good(table.get("t"), _job(slide), row["model_hash"]), error_type
        _forbid(monkeypatch)
        with pytest.raises(AssertionError, match="must not start"):
            analyze_slides([slide], out, model=model, config=CFG, progress=False)
    # an input error is permanent only for the model it was recorded with
    table.update("t", status="failed", error_type="UnreadableSlideError", error="x")
    assert failed_for_good(table.get("t"), _job(slide), row["model_hash"])
    assert not failed_for_good(table.get("t"), _job(slide), "another-model")


def _job(path):
    from wsi_cmaf.cluster.inputs import SlideJob

    return SlideJob(path, None, path.stem)


def test_cli_rerun_with_only_permanent_failures_starts_nothing(client, tmp_path):
    """`wsi-cmaf batch` over 1 done + 1 truncated slide: the rerun reads status.csv and imports
    neither torch nor dask, prints the failure and exits 1."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from wsi_cmaf.models import ModelConfig, create_model, save_model

    good = write_synthetic_slide(tmp_path / "g.tiff", 2400, 2000, 0.5, seed=4).path
    bad = tmp_path / "b.tiff"
    bad.write_bytes(good.read_bytes()[:200])
    cfg = ModelConfig(architecture="timm:test_resnet", num_classes=2, class_names=["benign", "malignant"],
                      input_size=32, stain_normalization=None, weights_note="test model (random weights)",
                      spacing_um_px=4.0, patch_size_pixels=50)
    model_dir = save_model(create_model("timm:test_resnet", num_classes=2), cfg, tmp_path / "model")
    out = tmp_path / "out"
    first = analyze_slides([good, bad], out, model=model_dir, client=client, config=CFG, progress=False)
    assert first.counts == {"done": 1, "failed": 1}
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)}
    probe = ("import sys, json, contextlib, io, time\nt0 = time.perf_counter()\nfrom wsi_cmaf.cli import main\n"
             "t1 = time.perf_counter()\nbuf = io.StringIO()\n"
             "with contextlib.redirect_stdout(buf):\n"
             f"    rc = main(['batch', {str(good)!r}, {str(bad)!r}, '--out', {str(out)!r}, "
             f"'--model', {str(model_dir)!r}, "
             "'--no-progress'])\n"
             "heavy = sorted(m for m in ('torch', 'dask', 'distributed') if m in sys.modules)\n"
             "print(json.dumps({'rc': rc, 'heavy': heavy, 'out': buf.getvalue(), 'work': time.perf_counter() - t1}))")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 1 and report["heavy"] == [], report
    assert report["work"] < 1.0, report
    assert "--retry-failed" in report["out"] and "2 skipped" in report["out"]
    rows = status_rows(out / "status.csv")
    assert len(rows) == 2
