"""Import cost (issue 18, item 5): ``import wsi_cmaf`` and ``wsi-cmaf --help`` must not load
torch, dask, zarr or distributed; those come in only when a verb or function needs them.

Timings are not asserted here (shared CI CPUs make them flaky); see the report in issue 18.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "dask", "zarr", "distributed")


def _env() -> dict[str, str]:
    # extend PYTHONPATH (never replace it): the child must import this checkout of wsi_cmaf
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def _heavy_loaded_by(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter, then report which heavy modules it left in sys.modules."""
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_wsi_cmaf_loads_no_heavy_module() -> None:
    assert _heavy_loaded_by("import wsi_cmaf") == []


def test_cli_help_loads_no_heavy_module() -> None:
    # --help exits through SystemExit(0) from argparse after printing; catch it to inspect sys.modules
    code = ("import contextlib, io\nfrom wsi_cmaf.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n"
            "    except SystemExit as exc:\n        assert exc.code == 0, exc.code\n"
            "assert 'usage: wsi-cmaf' in out.getvalue()")
    assert _heavy_loaded_by(code) == []


@pytest.mark.parametrize("verb", ["analyze", "info", "batch", "train"])
def test_verb_help_loads_no_heavy_module(verb: str) -> None:
    code = ("import contextlib, io\nfrom wsi_cmaf.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        main([{verb!r}, '--help'])\n    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n")
    assert _heavy_loaded_by(code) == []


def test_lazy_exports_resolve() -> None:
    """The lazy (PEP 562) exports still name the real objects, and unknown names still fail."""
    import wsi_cmaf.cluster
    import wsi_cmaf.infer
    import wsi_cmaf.slide
    from wsi_cmaf.slide.opener import open_slide

    assert wsi_cmaf.slide.open_slide is open_slide  # the opener that also resolves mpp="estimate"
    for pkg in (wsi_cmaf, wsi_cmaf.slide, wsi_cmaf.infer, wsi_cmaf.cluster):
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, (pkg.__name__, name)
        with pytest.raises(AttributeError):
            _ = pkg.no_such_export
