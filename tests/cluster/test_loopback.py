"""Local runs listen on 127.0.0.1 only and start a dashboard only when asked."""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from tests.helpers.models import DarknessClassifier, tiny_config
from wsi_cmaf.cluster import analyze_slides
from wsi_cmaf.cluster.engine import connect
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.modelspec import resolve_model
from wsi_cmaf.slide.synthetic import write_synthetic_slide

CFG = InferenceConfig(block_tiles=4, progress=False, batch_size=64, reader_threads=1, overlay=False, geojson=False)
LOOPBACK = {"127.0.0.1", "::1"}


def _listeners() -> set[tuple[str, int]]:
    """(ip, port) of every listening socket of this process and its children."""
    pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


class _Sampler:
    """Collects this process tree's listeners every few milliseconds while a run goes on."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.seen |= _listeners()
            time.sleep(0.02)

    def __enter__(self) -> _Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.seen |= _listeners()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("lo") / "lo.tiff", 2400, 2000, 0.5, seed=3).path


def test_analyze_slide_listens_on_loopback_only(slide, tmp_path):
    """The in-process pool used to open 0.0.0.0:8787 and a second 0.0.0.0 port although it asked for
    no dashboard: dask's HTTP servers bind every interface when given no address."""
    before = _listeners()
    model = resolve_model(DarknessClassifier(), tiny_config())
    with _Sampler() as s:
        analyze_slide(slide, model=model, out=tmp_path / "a", config=CFG)
    new = s.seen - before
    assert new, "no listener was seen: the sampler did not observe the run"
    assert {ip for ip, _ in new} <= LOOPBACK, sorted(new)
    assert not any(port == 8787 for _, port in new)  # no fixed port: two analyses at once never collide


def test_local_batch_listens_on_loopback_only_and_has_no_dashboard(slide, tmp_path):
    before = _listeners()
    model = resolve_model(DarknessClassifier(), tiny_config())
    with _Sampler() as s:
        res = analyze_slides([slide], tmp_path / "out", model=model, workers=2, config=CFG, progress=False)
    assert res.counts == {"done": 1}
    new = s.seen - before
    assert len(new) >= 6, sorted(new)  # scheduler, 2 nannies, 2 workers and their HTTP servers were seen
    assert {ip for ip, _ in new} <= LOOPBACK, sorted(new)
    assert res.dashboard is None


def _apps(c) -> list[str]:
    return c.run_on_scheduler(lambda dask_scheduler: [type(a).__name__ for a in
                                                      dask_scheduler.http_application.applications])


def test_dashboard_only_when_asked_and_on_loopback():
    with connect(cluster="local", workers=1) as c:
        port = c.scheduler_info()["services"]["dashboard"]  # the HTTP server, here without the dashboard
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).read() == b"ok"
        assert _apps(c) == []  # no Bokeh application behind it
        assert all(apps == [] for apps in c.run(lambda dask_worker: [
            type(a).__name__ for a in dask_worker.http_application.applications]).values())
    pytest.importorskip("bokeh", reason="the dashboard needs bokeh (the dev and dashboard extras install it)")
    with connect(cluster="local", workers=1, dashboard=True) as c:
        port = c.scheduler_info()["services"]["dashboard"]
        assert _apps(c) == ["DaskBokehTornado"]
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=60).read()
        assert b"Dask needs bokeh" not in page and b"bokeh" in page.lower()
        assert {ip for ip, p in _listeners() if p == port} == {"127.0.0.1"}


def test_dashboard_without_bokeh_is_a_named_error(monkeypatch):
    import sys

    from wsi_cmaf.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "distributed.dashboard.scheduler", None)  # as if bokeh were missing
    with pytest.raises(MissingDependencyError, match="bokeh"), connect(cluster="local", workers=1, dashboard=True):
        pass
