"""Shared fixtures: where the real scanner files are, with a clear skip when they are absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.realdata import REAL_SLIDES, real_data_dir

try:  # hypothesis is a dev dependency; without it only the fuzz test is skipped
    from hypothesis import HealthCheck, settings

    # "ci" (the default here): a fixed seed and a few dozen cases, well under a minute on 2 cores.
    # "long" (pytest --hypothesis-profile=long): thousands of cases with a fresh seed each run.
    _FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, database=None,
                              suppress_health_check=_FUZZ_HEALTH, print_blob=True)
    settings.register_profile("long", max_examples=3000, derandomize=False, deadline=None, database=None,
                              suppress_health_check=_FUZZ_HEALTH, print_blob=True)
except ImportError:  # pragma: no cover - hypothesis not installed
    settings = None


def pytest_configure(config: pytest.Config) -> None:
    """Load the short "ci" Hypothesis profile unless ``--hypothesis-profile`` names another."""
    if settings is not None and not config.getoption("--hypothesis-profile", default=None):
        settings.load_profile("ci")


@pytest.fixture(scope="session")
def real_slides_dir() -> Path:
    """The folder of real scanner files; skips the test (with the reason) when it is absent."""
    d = real_data_dir()
    if not d.is_dir():
        pytest.skip(f"real slide folder not found at {d} (set WSI_CMAF_TEST_DATA to point at it)")
    return d


@pytest.fixture(scope="session")
def real_slide(real_slides_dir: Path):
    """Callable ``real_slide(key)`` -> Path of one real slide (keys: svs, tiff, jp2k_svs, dicom)."""

    def get(key: str) -> Path:
        path = real_slides_dir / REAL_SLIDES[key]
        if not path.is_file():
            pytest.skip(f"real slide {path} is missing")
        return path

    return get


@pytest.fixture(scope="session")
def real_slides_dir_optional() -> list[dict]:
    """Rows (path, mpp) of the real slides for batch tests; empty (with a printed reason) when absent."""
    d = real_data_dir()
    if not d.is_dir():
        print(f"[wsi-cmaf tests] real slides not found at {d}: batch test runs on synthetic slides only")
        return []
    rows = []
    for key, name in REAL_SLIDES.items():
        p = d / name
        if p.is_file():
            # the TCGA JPEG 2000 file and the DICOM carry no µm/px; the batch CSV supplies one
            rows.append({"path": str(p), "mpp": "0.5" if key in ("jp2k_svs", "dicom") else ""})
    return rows
