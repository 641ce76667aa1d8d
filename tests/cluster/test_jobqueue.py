"""SLURM/PBS job scripts: worker lifetimes from the walltime, TLS, the project's Python (no scheduler needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wsi_cmaf.cli.batch import _parse_adapt
from wsi_cmaf.cluster.jobqueue import lifetime_for_walltime, make_jobqueue_cluster, walltime_seconds
from wsi_cmaf.errors import ConfigError


def test_walltime_forms():
    assert walltime_seconds("04:00:00") == 14400
    assert walltime_seconds("20:00") == 1200  # MM:SS
    assert walltime_seconds("90") == 5400  # minutes
    assert walltime_seconds("1-02") == 93600  # D-HH
    assert walltime_seconds("1-00:30:00") == 88200
    for bad in ("", "4h", "00:00:00", "1:2:3:4"):
        with pytest.raises(ConfigError):
            walltime_seconds(bad)


def test_lifetime_leaves_a_margin_before_the_walltime():
    # 4 h: margin 10 % = 1440 s, stagger 5 % = 720 s; the latest retirement is 720 s before the end
    assert lifetime_for_walltime("04:00:00") == (12960, 720)
    # 20 min: the margin is at least 5 minutes; stagger 60 s
    assert lifetime_for_walltime("00:20:00") == (900, 60)
    # 5 min: the margin is at most half the walltime, the stagger at most half the margin
    assert lifetime_for_walltime("00:05:00") == (150, 15)
    for w in ("00:05:00", "00:20:00", "04:00:00", "2-00:00:00"):
        life, stagger = lifetime_for_walltime(w)
        assert life - stagger > 0 and life + stagger < walltime_seconds(w)


def test_job_script_has_lifetime_tls_python_and_no_dashboard():
    pytest.importorskip("dask_jobqueue")
    cl = make_jobqueue_cluster("slurm", cores=2, memory="4GiB", walltime="04:00:00")
    try:
        script = cl.job_script()
        assert "--lifetime 12960s --lifetime-stagger 720s" in script
        assert "--protocol tls://" in script and "--tls-key" in script
        assert "--no-dashboard" in script and "--dashboard-address 127.0.0.1:0" in script
        assert script.count(sys.executable) >= 1  # the jobs run this environment's Python
        repo = str(Path(__file__).resolve().parents[2])
        assert f'export PYTHONPATH={repo}"${{PYTHONPATH:+:$PYTHONPATH}}"' in script  # extended, not replaced
        assert cl.scheduler_address.startswith("tls://")
    finally:
        cl.close()
    off = make_jobqueue_cluster("slurm", cores=2, memory="4GiB", walltime="04:00:00", lifetime=None)
    try:
        assert "--lifetime" not in off.job_script()
    finally:
        off.close()
    given = make_jobqueue_cluster("pbs", cores=2, memory="4GiB", lifetime="50m", lifetime_stagger=120)
    try:
        assert "--lifetime 50m --lifetime-stagger 120s" in given.job_script()
    finally:
        given.close()


def test_plain_tcp_scheduler_must_stay_on_loopback():
    pytest.importorskip("dask_jobqueue")
    with pytest.raises(ConfigError, match="TLS"):
        make_jobqueue_cluster("slurm", cores=1, memory="1GiB", security=None)


def test_adapt_argument():
    assert _parse_adapt("1:8") == (1, 8)
    assert _parse_adapt(None) is None
    for bad in ("8", "a:b", "3:2", "0:0", "-1:2"):
        with pytest.raises(ConfigError):
            _parse_adapt(bad)
