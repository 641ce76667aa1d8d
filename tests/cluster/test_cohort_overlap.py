"""Slides in flight on one batch worker: shared reader pool, bounded concurrency, same heatmaps."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cluster import batch
from wsi_cmaf.cluster.batch import analyze_slides, slide_task
from wsi_cmaf.cluster.engine import connect
from wsi_cmaf.cluster.inputs import collect_slides
from wsi_cmaf.cluster.worker_model import make_model_ref
from wsi_cmaf.cluster.worker_pool import (
    close_reader_clients,
    pools_created,
    reader_client,
    shared_reader_pool,
    thread_reader_pool,
)
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.slide.synthetic import write_synthetic_slide

# macenko: the stain fit is part of each slide's fixed work that overlaps the other's reads
CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, reader_threads=1, overlay=True,
                      geojson=True, stain="macenko")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("cohort")
    return [write_synthetic_slide(root / f"s{i}.tiff", 2800 + 400 * i, 2400, 0.5, seed=20 + i).path
            for i in range(3)]


@pytest.fixture(scope="module")
def model():
    return resolve_model(DarknessClassifier(), tiny_config())


def _heatmap(store: str | Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r")["0"])


def test_two_slides_in_flight_match_one_at_a_time(slides, model, tmp_path):
    close_reader_clients()
    jobs = collect_slides([str(p) for p in slides])
    ref = make_model_ref(model, model, None, tmp_path)
    one = [slide_task(j, str(tmp_path / "one"), ref, CFG) for j in jobs]
    with ThreadPoolExecutor(2) as pool:  # two slide tasks of one worker process at once
        two = list(pool.map(lambda j: slide_task(j, str(tmp_path / "two"), ref, CFG), jobs))
    assert [r["status"] for r in one + two] == ["done"] * 6, [r.get("error") for r in one + two]
    for a, b, path in zip(one, two, slides):
        own = analyze_slide(path, model=model, out=tmp_path / "own" / path.stem, config=CFG)
        assert int(a["tissue_tiles"]) == int(b["tissue_tiles"]) == own.tiles_tissue > 0
        np.testing.assert_array_equal(_heatmap(a["output"]), _heatmap(b["output"]))
        np.testing.assert_array_equal(_heatmap(a["output"]), _heatmap(own.store))
        assert (Path(b["output"]).parent / f"{path.stem}_overlay.png").is_file()  # exports still made
    assert pools_created() == 1  # six slide tasks, one reader pool for the process
    close_reader_clients()


def test_reader_pool_is_made_once_per_process_and_only_inside_batch_tasks():
    close_reader_clients()
    before = pools_created()
    assert thread_reader_pool(1) is None  # plain analyze_slide calls keep their own short-lived pool
    seen = []

    def grab() -> None:
        with shared_reader_pool():
            seen.append(thread_reader_pool(1))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and all(c is seen[0] for c in seen)
    assert pools_created() - before == 1
    assert thread_reader_pool(1) is None  # the flag does not leak out of the block
    seen[0].close()
    assert reader_client(1) is not seen[0]  # a closed pool is replaced
    assert pools_created() - before == 2
    with shared_reader_pool(3):  # three slides in flight, one reader thread each: one pool of three
        pool = thread_reader_pool(1)
    assert [w["nthreads"] for w in pool.scheduler_info()["workers"].values()] == [3]
    close_reader_clients()
    with pytest.raises(ConfigError, match="reader_threads"):
        reader_client(0)


def test_local_workers_run_at_most_slides_per_worker_slides(monkeypatch, slides, model, tmp_path):
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_connect(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(batch, "connect", fake_connect)
    with pytest.raises(Stop):
        analyze_slides(slides, tmp_path / "out", model=model, config=CFG, progress=False, slides_per_worker=3)
    assert seen["threads_per_worker"] == 3
    with pytest.raises(Stop):
        analyze_slides(slides, tmp_path / "out2", model=model, config=CFG, progress=False)
    assert seen["threads_per_worker"] == 2  # the default: one slide's fixed work beside another's reads
    with pytest.raises(ConfigError, match="slides_per_worker"):
        analyze_slides(slides, tmp_path / "out3", model=model, config=CFG, progress=False, slides_per_worker=0)
    # and that number is what dask lets run at once on each worker process
    with connect(cluster="local", workers=1, threads_per_worker=3) as c:
        (info,) = c.scheduler_info()["workers"].values()
        assert info["nthreads"] == 3


def _pool_threads_in_task() -> int:
    with shared_reader_pool():
        pool = thread_reader_pool(1)
    return sum(w["nthreads"] for w in pool.scheduler_info()["workers"].values())


def test_pool_has_reader_threads_for_each_slide_a_worker_runs():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cl, \
            Client(cl) as c:
        assert c.submit(_pool_threads_in_task, pure=False).result() == 2
    close_reader_clients()
