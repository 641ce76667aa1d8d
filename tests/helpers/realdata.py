"""Where the real scanner files live (``WSI_CMAF_TEST_DATA`` or ``../shared/data/slides`` beside
the repository) and which file each key names."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

REAL_SLIDES = {
    "svs": "cmu_small_region.svs",
    "tiff": "cmu_small_region_pyramid_3level.tiff",
    "jp2k_svs": "tcga-cr-7395-01a-01-ts1.svs",
    "dicom": "small_dicom.dcm",
}


def real_data_dir() -> Path:
    """The folder of real slides: ``$WSI_CMAF_TEST_DATA`` when set, else ``../shared/data/slides``."""
    env = os.environ.get("WSI_CMAF_TEST_DATA")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data" / "slides"
