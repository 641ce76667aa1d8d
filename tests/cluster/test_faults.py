"""Lost workers on a real LocalCluster: a batch costs only the slides they were running."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers.batch import status_rows
from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cluster import analyze_slides
from wsi_cmaf.cluster.engine import connect
from wsi_cmaf.cluster.worker_model import ModelRef, load_model_ref, make_model_ref
from wsi_cmaf.errors import ModelError
from wsi_cmaf.infer import InferenceConfig
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.slide.synthetic import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, reader_threads=1, overlay=False, geojson=False)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return [write_synthetic_slide(root / f"k{i}.tiff", 2400 + 400 * (i % 2), 2000, 0.5, seed=10 + i).path
            for i in range(4)]


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory):
    """Heatmaps of the same slides and model from the single-slide API (a batch must match it)."""
    from wsi_cmaf.infer import analyze_slide

    out = tmp_path_factory.mktemp("reference")
    model = resolve_model(DarknessClassifier(), tiny_config())
    ref = {}
    for p in slides:
        res = analyze_slide(p, model=model, out=out / p.stem, config=CFG)
        ref[str(p)] = np.asarray(zarr.open_group(str(res.store), mode="r")["0"])
    return ref


@pytest.fixture(scope="module")
def local_client():
    with connect(cluster="local", workers=2, retries=2) as c:
        yield c


def _check_consistent(out: Path, res, slides, reference) -> None:
    """Every slide done, one row each, heatmaps bit-identical to the undisturbed run."""
    rows = status_rows(out / "status.csv")
    assert sorted(r["slide"] for r in rows) == sorted(str(p) for p in slides)
    assert all(r["status"] == "done" for r in rows), [(r["key"], r["status"], r["error"]) for r in rows]
    for r in rows:
        heat = np.asarray(zarr.open_group(r["output"], mode="r")["0"])
        np.testing.assert_array_equal(heat, reference[r["slide"]])
        assert np.isfinite(heat).any()
    assert res.counts == {"done": len(slides)}


def _kill_when_busy(c, out: Path, pick, killed: list, after: float = 0.3) -> threading.Thread:
    """Kill worker processes (SIGKILL) once slides are being written; ``pick`` chooses which."""

    def run() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            busy = [addr for addr, keys in c.processing().items() if keys]
            if busy and list(out.glob("*/*.zarr")):
                time.sleep(after)
                pids = c.run(os.getpid)
                for addr in pick(busy, list(pids)):
                    os.kill(pids[addr], signal.SIGKILL)
                    killed.append(addr)
                return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_every_worker_killed_mid_batch_costs_only_their_slides(slides, reference, local_client, tmp_path):
    """Both worker processes die at once mid-batch (a node failure). With the model scattered from
    the client this lost its only copies and failed every slide in flight; loaded per worker, the
    restarted workers load it again and every slide ends done, bit-identical."""
    out = tmp_path / "out"
    model = resolve_model(DarknessClassifier(delay=0.15), tiny_config())
    killed: list[str] = []
    c = local_client
    c.wait_for_workers(2, timeout=120)
    t = _kill_when_busy(c, out, lambda busy, all_: all_, killed)
    res = analyze_slides(slides, out, model=model, client=c, config=CFG, progress=False, retries=2)
    t.join()
    assert all(str(k).startswith("slide-") for k in c.who_has()), "only slide results may live on workers"
    assert len(killed) == 2, "the workers were never killed: the test did not exercise recovery"
    _check_consistent(out, res, slides, reference)


def test_one_killed_worker_gives_identical_heatmaps_and_status(slides, reference, local_client, tmp_path):
    out = tmp_path / "out"
    model = resolve_model(DarknessClassifier(delay=0.15), tiny_config())
    killed: list[str] = []
    c = local_client
    c.wait_for_workers(2, timeout=120)
    t = _kill_when_busy(c, out, lambda busy, all_: busy[:1], killed)
    res = analyze_slides(slides, out, model=model, client=c, config=CFG, progress=False, retries=2)
    t.join()
    assert killed
    _check_consistent(out, res, slides, reference)
    attempts = {r["key"]: r for r in status_rows(out / "status.csv")}
    assert all(int(r["attempts"]) == 1 for r in attempts.values())  # rescheduled by dask, not resubmitted


def test_worker_model_cache_is_keyed_by_hash_and_refuses_changed_weights(tmp_path):
    model = resolve_model(DarknessClassifier(), tiny_config())
    ref = make_model_ref(model, model, None, tmp_path)
    assert ref.kind == "pickle" and Path(ref.path).is_file() and ref.sha256 == model.weights_sha256
    first = load_model_ref(ref)
    assert load_model_ref(ref) is first  # loaded once per process
    other = DarknessClassifier()
    with __import__("torch").no_grad():
        other.fc.bias[1] = 0.5
    changed = resolve_model(other, tiny_config())
    bad = ModelRef("pickle", str(make_model_ref(changed, changed, None, tmp_path / "x").path), "0" * 64)
    with pytest.raises(ModelError, match="changed while the batch ran"):
        load_model_ref(bad)


def test_sigterm_of_the_client_leaves_a_batch_a_rerun_finishes(slides, tmp_path):
    """`wsi-cmaf batch` gets SIGTERM mid-batch: it exits 143, closes its cluster, marks the slides in
    flight 'interrupted' (none left 'running'), and the same command then finishes the batch."""
    from wsi_cmaf.cli import main
    from wsi_cmaf.models import ModelConfig, create_model, save_model

    cfg = ModelConfig(architecture="timm:test_resnet", num_classes=2, class_names=["benign", "malignant"],
                      input_size=32, stain_normalization=None, weights_note="test model (random weights)",
                      spacing_um_px=4.0, patch_size_pixels=50)
    model_dir = save_model(create_model("timm:test_resnet", num_classes=2), cfg, tmp_path / "model")
    out = tmp_path / "out"
    slides = slides[:3]
    argv = ["batch", *map(str, slides), "--out", str(out), "--model", str(model_dir), "--no-progress",
            "--workers", "1", "--no-overlay", "--no-geojson", "--batch-size", "8"]
    sent: list[float] = []

    def terminate_soon() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob("*/*.zarr")):
            time.sleep(0.05)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=terminate_soon, daemon=True)
    t.start()
    rc = main(argv)
    t.join()
    assert sent and rc == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    rows = status_rows(out / "status.csv")
    assert rows and not any(r["status"] == "running" for r in rows)  # nothing in flight looks finished
    assert any(r["status"] == "interrupted" for r in rows), rows
    assert main(argv) == 0
    rows = status_rows(out / "status.csv")
    assert len(rows) == len(slides) and all(r["status"] == "done" for r in rows), rows
