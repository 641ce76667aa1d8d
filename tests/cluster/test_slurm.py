"""Real jobs on a single-node SLURM (started by .ci/slurm-up): lost jobs, TLS, GPUs per job.

Skips with the reason when SLURM cannot be brought up here (not root, no apt, no packages).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers.batch import status_rows
from tests.helpers.models import DarknessClassifier, tiny_config
from tests.helpers.slurm import ensure_slurm, jobs_named, node_gpus, running_jobs_named
from wsi_cmaf.cluster import analyze_slides
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.slide.synthetic import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, reader_threads=1, overlay=False, geojson=False)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm():
    reason = ensure_slurm()
    if reason:
        print(f"[wsi-cmaf tests] SLURM tests skip: {reason}")
        pytest.skip(reason)


def _job_options(name: str, logs: Path | None = None, **extra) -> dict:
    logs = {"log_directory": str(logs)} if logs is not None else {}  # analyze_slides puts them in OUT
    return {"cores": 1, "memory": "3GiB", "walltime": "00:10:00", "job_name": name, **logs, **extra}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_slides")
    return [write_synthetic_slide(root / f"j{i}.tiff", 2400 + 400 * (i % 2), 2000, 0.5, seed=20 + i).path
            for i in range(8)]


@pytest.mark.timeout(300)
def test_scancel_of_a_job_mid_batch_costs_only_its_slides(slurm, slides, tmp_path):
    """Two jobs; one is cancelled (as preemption or a walltime would) while it runs a slide. Every
    slide ends done, bit-identical to the single-slide API, and a replacement job is submitted."""
    name = f"wsi-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    model = resolve_model(DarknessClassifier(delay=0.5), tiny_config())
    same = resolve_model(DarknessClassifier(), tiny_config())  # same weights, no delay: the reference
    seen: set[str] = set()
    cancelled: list[str] = []

    def cancel_one() -> None:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            running = running_jobs_named(name)
            seen.update(jobs_named(name))
            if not cancelled and len(running) == 2 and list(out.glob("*/*.zarr")):
                time.sleep(0.5)
                subprocess.run(["scancel", running[0]], check=True, timeout=30)
                cancelled.append(running[0])
            if cancelled and len(seen) >= 3:
                return
            time.sleep(0.2)

    t = threading.Thread(target=cancel_one, daemon=True)
    t.start()
    res = analyze_slides(slides, out, model=model, cluster="slurm", workers=2, config=CFG, progress=False,
                         cluster_kwargs=_job_options(name))
    t.join(timeout=60)
    assert cancelled, "no job was cancelled mid-batch: the test did not exercise a lost job"
    rows = status_rows(out / "status.csv")
    assert len(rows) == len(slides) and all(r["status"] == "done" for r in rows), rows
    assert res.counts == {"done": len(slides)}
    for p in slides:
        row = next(r for r in rows if r["slide"] == str(p))
        single = analyze_slide(p, model=same, out=tmp_path / "single" / p.stem, config=CFG)
        np.testing.assert_array_equal(np.asarray(zarr.open_group(row["output"], mode="r")["0"]),
                                      np.asarray(zarr.open_group(str(single.store), mode="r")["0"]))
    assert len(seen) >= 3, f"no replacement job was submitted after the cancellation (jobs seen: {sorted(seen)})"
    assert not jobs_named(name)  # the batch's jobs are gone when it ends
    assert list((out / ".wsi-cmaf-logs").glob(f"{name}-*.out"))  # the jobs' logs beside the results


@pytest.mark.timeout(300)
def test_a_retired_worker_is_replaced_and_the_batch_goes_on(slurm, slides, tmp_path):
    """The only job's worker retires mid-batch, as --lifetime makes it do before its walltime
    (dask's graceful retirement): a replacement job is started and every slide ends done."""
    from wsi_cmaf.cluster.engine import connect

    name = f"wsi-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    model = resolve_model(DarknessClassifier(delay=0.5), tiny_config())
    seen: set[str] = set()
    retired: list[str] = []
    with connect(cluster="slurm", workers=1, cluster_kwargs=_job_options(name, tmp_path / "logs")) as c:
        def retire_once() -> None:
            deadline = time.monotonic() + 200
            while time.monotonic() < deadline and not (retired and len(seen) >= 2):
                seen.update(jobs_named(name))
                if not retired and list(out.glob("*/*.zarr")):
                    workers = list(c.scheduler_info()["workers"])
                    if workers:
                        c.retire_workers(workers=workers, close_workers=True)
                        retired.extend(workers)
                time.sleep(0.3)

        t = threading.Thread(target=retire_once, daemon=True)
        t.start()
        res = analyze_slides(slides[:4], out, model=model, client=c, config=CFG, progress=False)
        t.join(timeout=60)
    assert retired, "the worker was never retired mid-batch"
    assert res.counts == {"done": 4}, res.rows
    assert len(seen) >= 2, f"no replacement job was started (jobs: {sorted(seen)})"


@pytest.mark.timeout(300)
def test_cli_batch_on_slurm_runs_the_projects_python(slurm, slides, tmp_path):
    """`wsi-cmaf batch --cluster slurm` with a saved model, from another folder than the
    repository: the jobs find the project, and the heatmaps match the single-slide API."""
    from wsi_cmaf.models import ModelConfig, create_model, save_model

    cfg = ModelConfig(architecture="timm:test_resnet", num_classes=2, class_names=["benign", "malignant"],
                      input_size=32, stain_normalization=None, weights_note="test model (random weights)",
                      spacing_um_px=4.0, patch_size_pixels=50)
    model_dir = save_model(create_model("timm:test_resnet", num_classes=2), cfg, tmp_path / "model")
    name = f"wsi-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "wsi_cmaf", "batch", str(slides[0]), "--out", str(out),
           "--model", str(model_dir), "--cluster", "slurm", "--workers", "1", "--no-progress", "--no-overlay",
           "--no-geojson", "--cluster-options", json.dumps(_job_options(name))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "1 slides (done: 1)" in proc.stdout
    rows = status_rows(out / "status.csv")
    for row in rows:
        p = Path(row["slide"])
        single = analyze_slide(p, model=model_dir, out=tmp_path / "single" / p.stem, config=CFG)
        np.testing.assert_array_equal(np.asarray(zarr.open_group(row["output"], mode="r")["0"]),
                                      np.asarray(zarr.open_group(str(single.store), mode="r")["0"]))


def test_scheduler_speaks_tls_and_refuses_clients_without_the_runs_credentials(slurm):
    from distributed import Client
    from distributed.security import Security

    from wsi_cmaf.cluster.jobqueue import make_jobqueue_cluster

    cl = make_jobqueue_cluster("slurm", cores=1, memory="1GiB", walltime="00:05:00")  # no jobs started
    try:
        addr = cl.scheduler_address
        assert addr.startswith("tls://")
        assert "--tls-ca-file" in cl.job_script() and "--protocol tls://" in cl.job_script()
        with pytest.raises((OSError, TypeError, ValueError)):  # no credentials: refused
            Client(addr.replace("tls://", "tcp://"), timeout="5s")
        with pytest.raises(OSError):  # other credentials (another CA): the handshake fails
            Client(addr, security=Security.temporary(), timeout="5s")
        with Client(addr, security=cl.security, timeout="30s") as c:  # the run's own: accepted
            assert c.scheduler_info()["address"] == addr
    finally:
        cl.close()


@pytest.mark.timeout(240)
def test_each_job_gets_its_own_gpu_whatever_the_caller_exported(slurm, monkeypatch, tmp_path):
    """--gpus-per-worker 1 on SLURM: each job's worker sees one GPU, its own (SLURM's gres sets
    CUDA_VISIBLE_DEVICES), even when the submitting shell exported all of them."""
    if node_gpus() < 2:
        pytest.skip("the SLURM node declares fewer than 2 GPUs (gres); .ci/slurm-up gives it 2 fake ones")
    from wsi_cmaf.cluster.engine import connect

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # inherited by sbatch's default --export=ALL
    marker = "/opt/site-python-entry"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (marker, os.environ.get("PYTHONPATH", "")) if p))
    name = f"wsi-{uuid.uuid4().hex[:8]}"
    with connect(cluster="slurm", workers=2, gpus_per_worker=1, slides_per_gpu=2,
                 cluster_kwargs=_job_options(name, tmp_path / "logs")) as c:
        c.wait_for_workers(2, timeout=120)
        envs = c.run(os.getenv, "CUDA_VISIBLE_DEVICES")
        info = c.scheduler_info()["workers"]
        pythons = c.run(lambda: sys.executable)
        paths = c.run(os.getenv, "PYTHONPATH")
    assert sorted(envs.values()) == ["0", "1"], envs
    assert all(w["resources"] == {"GPU": 2} for w in info.values()), info
    assert set(pythons.values()) == {sys.executable}
    for p in paths.values():  # the project's source added, the caller's entries kept
        assert str(REPO) in p.split(os.pathsep) and marker in p.split(os.pathsep), paths
