"""Batch processing on a real dask LocalCluster with worker processes (loopback only)."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster

from tests.helpers.batch import status_rows
from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cluster import analyze_slides, collect_slides
from wsi_cmaf.cluster.engine import make_jobqueue_cluster
from wsi_cmaf.cluster.status import StatusTable
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.slide.synthetic import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, reader_threads=1,
                      overlay=False, geojson=False)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, request):
    """6 synthetic slides (two share a file name in different folders) + one corrupt file + real slides."""
    root = tmp_path_factory.mktemp("archive")
    paths = []
    for i in range(6):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        name = "same.tiff" if i < 2 else f"s{i}.tiff"
        paths.append(write_synthetic_slide(folder / name, 3200 + 400 * i, 2400, 0.5, seed=i).path)
    bad = root / "b" / "corrupt.svs"
    bad.write_text("this is not a slide\n" * 100)
    rows = [{"path": str(p), "mpp": ""} for p in paths] + [{"path": str(bad), "mpp": ""}]
    return root, paths, bad, rows


def _csv(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "slides.csv"
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "mpp"])
        w.writeheader()
        w.writerows(rows)
    return p


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
            Client(cl) as c:
        yield c


def test_collect_slides_inputs(archive, tmp_path):
    root, paths, bad, rows = archive
    jobs = collect_slides(root)
    assert len(jobs) == 7
    keys = [j.key for j in jobs]
    assert len(set(keys)) == len(keys)  # same file name in two folders -> distinct outputs
    assert len(collect_slides(str(root / "*" / "s[0-9].tiff"))) == 4
    csv_jobs = collect_slides(_csv(tmp_path, [{"path": str(paths[0]), "mpp": "0.5"}]))
    assert csv_jobs[0].mpp == 0.5
    with pytest.raises(ConfigError):
        collect_slides(_csv(tmp_path, [{"path": str(paths[0]), "mpp": "abc"}]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError):
        collect_slides(empty)
    # a missing single path is kept, to be reported as that slide's failure, not the batch's
    assert len(collect_slides(tmp_path / "missing.svs")) == 1


def test_batch_good_bad_rerun_and_identical_heatmaps(archive, client, tmp_path, real_slides_dir_optional):
    root, paths, bad, rows = archive
    rows = rows + real_slides_dir_optional
    out = tmp_path / "out"
    model = resolve_model(DarknessClassifier(), tiny_config())
    res = analyze_slides(_csv(tmp_path, rows), out, model=model, client=client, config=CFG, progress=False)
    by_path = {r["slide"]: r for r in res.rows}
    assert by_path[str(bad)]["status"] == "failed" and by_path[str(bad)]["error"]
    good = [r for r in res.rows if r["slide"] != str(bad)]
    assert all(r["status"] == "done" for r in good), [(r["slide"], r["status"], r["error"]) for r in good]
    table = status_rows(out / "status.csv")
    assert len(table) == len(rows)
    # same result as the single-process API on the same slide
    single = analyze_slide(paths[3], model=model, out=tmp_path / "single", config=CFG)
    a = np.asarray(zarr.open_group(str(single.store), mode="r")["0"])
    b = np.asarray(zarr.open_group(by_path[str(paths[3])]["output"], mode="r")["0"])
    np.testing.assert_array_equal(a, b)
    # a rerun does no work for finished slides, nor for the unreadable one (same file, input error)
    again = analyze_slides(_csv(tmp_path, rows), out, model=model, client=client, config=CFG, progress=False)
    assert again.skipped == len(good) + 1
    assert again.counts.get("done") == len(good) and again.counts.get("failed") == 1


def test_batch_survives_a_killed_worker(archive, tmp_path):
    root, paths, bad, rows = archive
    model = resolve_model(DarknessClassifier(delay=0.3), tiny_config())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
            Client(cl) as c:
        victim = list(cl.workers.values())[0]

        killed: list[int] = []
        out = tmp_path / "out"

        def kill_soon() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if list(out.glob("*/*.zarr/wsi_cmaf")):  # a slide task is writing its store
                    time.sleep(0.5)
                    os.kill(victim.process.process.pid, signal.SIGKILL)  # a worker dies mid-task
                    killed.append(1)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=kill_soon, daemon=True)
        t.start()
        res = analyze_slides(paths, out, model=model, client=c, config=CFG, progress=False)
        t.join()
    assert killed, "the worker was never killed: the test did not exercise rescheduling"
    assert all(r["status"] == "done" for r in res.rows), res.rows


def test_status_table_atomic_roundtrip(tmp_path):
    t = StatusTable(tmp_path / "status.csv")
    t.update("a", slide="/x/a.svs", status="done", tissue_tiles=3)
    t.update("b", slide="/x/b.svs", status="failed", error="bad, really")
    again = StatusTable(tmp_path / "status.csv")
    assert again.get("a")["status"] == "done" and again.get("b")["error"] == "bad, really"
    assert again.counts() == {"done": 1, "failed": 1}
    assert not list(tmp_path.glob(".status-*"))


def test_slurm_job_script_has_gpu_resources():
    pytest.importorskip("dask_jobqueue")
    cl = make_jobqueue_cluster("slurm", gpus_per_job=1, cores=4, memory="8GiB", queue="gpu",
                               walltime="01:00:00")
    try:
        script = cl.job_script()
    finally:
        cl.close()
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script
    assert "#SBATCH -p gpu" in script
    two = make_jobqueue_cluster("slurm", gpus_per_job=1, slides_per_gpu=2, cores=4, memory="8GiB")
    try:
        assert "--resources GPU=2" in two.job_script()
    finally:
        two.close()
    pbs = make_jobqueue_cluster("pbs", gpus_per_job=2, cores=4, memory="8GiB")
    try:
        assert "-l ngpus=2" in pbs.job_script()
    finally:
        pbs.close()


def test_rerun_of_finished_batch_starts_no_cluster_and_loads_no_model(archive, client, tmp_path, monkeypatch):
    import wsi_cmaf.cluster.batch as batch_mod

    root, paths, bad, rows = archive
    out = tmp_path / "out"
    model = resolve_model(DarknessClassifier(), tiny_config())
    first = analyze_slides(paths[:2], out, model=model, client=client, config=CFG, progress=False)
    assert first.counts == {"done": 2}

    def forbidden(*a, **k):
        raise AssertionError("a finished batch must not start a cluster or load the model")

    monkeypatch.setattr(batch_mod, "connect", forbidden)
    monkeypatch.setattr(batch_mod, "resolve_model", forbidden)
    t0 = time.perf_counter()
    again = analyze_slides(paths[:2], out, model=DarknessClassifier(), config=CFG, progress=False)
    assert again.skipped == 2 and again.counts == {"done": 2}
    assert time.perf_counter() - t0 < 1.0
    # one slide not done (its row lost): now the cluster is needed
    table = StatusTable(out / "status.csv")
    table.update(table.rows[next(iter(table.rows))]["key"], status="failed")
    with pytest.raises(AssertionError, match="must not start"):
        analyze_slides(paths[:2], out, model=DarknessClassifier(), config=CFG, progress=False)


def test_local_gpu_cluster_pins_one_device_per_worker(monkeypatch):
    """One worker per GPU, its own device first in CUDA_VISIBLE_DEVICES (checked without a GPU)."""
    import sys

    from wsi_cmaf.cluster.engine import connect

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # LocalCUDACluster needs NVML: use our pinning
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with connect(cluster="local", gpus_per_worker=1, slides_per_gpu=2) as c:
        info = c.scheduler_info()["workers"]
        envs = c.run(os.getenv, "CUDA_VISIBLE_DEVICES")  # a stdlib function: workers import nothing of ours
    assert sorted(envs.values()) == ["0,1", "1,0"]
    for addr, w in info.items():
        assert envs[addr].split(",")[0] == str(w["name"])  # worker named after its own device
        assert w["nthreads"] == 2 and w["resources"] == {"GPU": 2}  # two slides in flight per GPU


def test_two_slides_in_flight_per_gpu_worker_give_identical_heatmaps(archive, tmp_path, monkeypatch):
    """GPU-style workers (2 slide tasks at once, here computing on CPU) match the single-slide API."""
    import sys

    root, paths, bad, rows = archive
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    model = resolve_model(DarknessClassifier(delay=0.05), tiny_config())
    cfg = InferenceConfig(block_tiles=4, progress=False, batch_size=64, reader_threads=1, device="cpu",
                          overlay=False, geojson=False)
    res = analyze_slides(paths[:4], tmp_path / "out", model=model, cluster="local-cuda", slides_per_gpu=2,
                         config=cfg, progress=False)
    assert res.counts == {"done": 4}, res.rows
    single = analyze_slide(paths[2], model=model, out=tmp_path / "single", config=cfg)
    row = next(r for r in res.rows if r["slide"] == str(paths[2]))
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(single.store), mode="r")["0"]),
                                  np.asarray(zarr.open_group(row["output"], mode="r")["0"]))


def test_cli_rerun_of_finished_batch_imports_neither_torch_nor_dask(archive, client, tmp_path):
    """`wsi-cmaf batch` answers a finished archive from status.csv alone (issue 12's rerun floor):
    no torch, model code, zarr or dask.distributed is imported, and the table is printed as before."""
    import json
    import subprocess
    import sys

    from wsi_cmaf.models import ModelConfig, create_model, save_model

    root, paths, bad, rows = archive
    cfg = ModelConfig(architecture="timm:test_resnet", num_classes=2, class_names=["benign", "malignant"],
                      input_size=32, stain_normalization=None, weights_note="test model (random weights)")
    model_dir = save_model(create_model("timm:test_resnet", num_classes=2), cfg, tmp_path / "model")
    out = tmp_path / "out"
    first = analyze_slides(paths[:2], out, model=model_dir, client=client, config=CFG, progress=False)
    assert first.counts == {"done": 2}
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # extend, never replace
        p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)}
    probe = ("import sys, json, contextlib, io\nfrom wsi_cmaf.cli import main\n"
             "buf = io.StringIO()\n"
             "with contextlib.redirect_stdout(buf):\n"
             f"    rc = main(['batch', {str(paths[0])!r}, {str(paths[1])!r}, '--out', {str(out)!r}, "
             f"'--model', {str(model_dir)!r}, '--no-progress'])\n"
             "heavy = sorted(m for m in ('torch', 'timm', 'dask', 'distributed', 'zarr') if m in sys.modules)\n"
             "print(json.dumps({'rc': rc, 'heavy': heavy, 'out': buf.getvalue()}))")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0 and report["heavy"] == []
    assert "2 slides (done: 2); 2 skipped as already done" in report["out"]
    # teeth: with one slide's output gone the same command needs the engine (and redoes that slide)
    import shutil

    table = StatusTable(out / "status.csv")
    lost = table.rows[next(iter(table.rows))]
    shutil.rmtree(lost["output"])
    proc = subprocess.run([sys.executable, "-c", probe.replace("'--no-progress'", "'--no-progress', '--workers', '1'")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0 and "torch" in report["heavy"] and "distributed" in report["heavy"], report["out"]
    assert "1 skipped as already done" in report["out"]
