"""µm/px resolution chain: every readable source, recorded source, disagreement warnings,
plausible-range checks on overrides and metadata (issue 13 §2)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers.slides import make_image
from wsi_cmaf.errors import ConfigError, ImplausibleResolutionError
from wsi_cmaf.slide import open_slide
from wsi_cmaf.slide._mpp import parse_description


def write_described_tiff(path: Path, description: str, resolution_mpp: float | None = None) -> Path:
    """A tiled 2-level TIFF with a chosen level-0 ImageDescription (and optional resolution tags)."""
    image = make_image(1024, 768)
    kwargs = {}
    if resolution_mpp is not None:
        kwargs = {"resolution": (1e4 / resolution_mpp, 1e4 / resolution_mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(256, 256), photometric="rgb", description=description, metadata=None,
                 subfiletype=0, **kwargs)
        tw.write(np.ascontiguousarray(image[::4, ::4]), tile=(256, 256), photometric="rgb", metadata=None,
                 subfiletype=0)
    return path


def _warnings(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_aperio_fields_in_a_generic_tiff_are_read_by_every_backend(tmp_path, backend, caplog):
    # Not "Aperio ..." at the start: OpenSlide opens it as generic-tiff and tiffslide as a plain
    # TIFF; neither reports the µm/px, the description parser does.
    path = write_described_tiff(tmp_path / "g.tif", "ScanTool 2.1\n1024x768 [0,0 1024x768] JPEG|MPP = 0.5|AppMag = 20")
    with caplog.at_level(logging.WARNING), open_slide(path, backend=backend) as r:
        assert r.mpp == (0.5, 0.5) and r.mpp_source == "description"
        assert r.objective_power == 20.0
        if backend == "openslide":
            assert r.vendor == "generic-tiff"
    assert "disagree" not in _warnings(caplog)


def test_sources_that_disagree_are_named_in_a_warning(tmp_path, caplog):
    path = write_described_tiff(tmp_path / "d.svs", "Aperio Image Library v12\n1024x768|MPP = 0.25|AppMag = 20",
                                resolution_mpp=0.5)
    with caplog.at_level(logging.WARNING), open_slide(path, backend="openslide") as r:
        assert r.mpp == (0.25, 0.25) and r.mpp_source == "vendor"
    msg = _warnings(caplog)
    assert "µm/px sources disagree: using vendor 0.25 x 0.25" in msg
    assert "tiff-resolution says 0.5 x 0.5" in msg and "objective power 20x suggests ~0.5" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING), open_slide(path, mpp=0.3) as r:
        assert r.mpp == (0.3, 0.3) and r.mpp_source == "override"
    assert "using override 0.3 x 0.3, but vendor says 0.25 x 0.25" in _warnings(caplog)


def test_agreeing_sources_are_quiet(tmp_path, caplog):
    path = write_described_tiff(tmp_path / "a.svs", "Aperio Image Library v12\n1024x768|MPP = 0.2520|AppMag = 40",
                                resolution_mpp=0.252)
    with caplog.at_level(logging.WARNING), open_slide(path) as r:
        assert r.mpp == (0.252, 0.252)
    assert _warnings(caplog) == ""


@pytest.mark.parametrize("bad", [1e6, 0.04, 100.5, (0.25, 200.0)])
def test_implausible_override_is_a_named_error(tmp_path, bad):
    path = write_described_tiff(tmp_path / "o.tif", "plain")
    with pytest.raises(ImplausibleResolutionError) as exc:
        open_slide(path, mpp=bad)
    msg = str(exc.value)
    assert repr(bad) in msg and "outside the plausible range 0.05-100 µm/px" in msg
    assert isinstance(exc.value, ConfigError)
    for ok in (0.05, 100.0):
        with open_slide(path, mpp=ok) as r:
            assert r.mpp == (ok, ok)


def test_implausible_metadata_is_ignored_with_a_warning(tmp_path, caplog):
    path = write_described_tiff(tmp_path / "m.tif", "Tool|MPP = 0.0001|AppMag = 40")
    with caplog.at_level(logging.WARNING), open_slide(path) as r:
        assert r.mpp_source == "objective-power" and r.mpp == (0.25, 0.25)
    assert "ignoring the description µm/px (0.0001, 0.0001)" in _warnings(caplog)


def test_parse_description_formats():
    assert parse_description("Aperio Image Library v11.2.1\n46000x32914 -> 11500x8228 - ;Aperio "
                             "Image Library v11.0.37\n|AppMag = 20|MPP = 0.4990") == ((0.499, 0.499), 20.0, "aperio")
    ome = ('<OME><Image><Pixels PhysicalSizeX="250" PhysicalSizeXUnit="nm" PhysicalSizeY="0.26" '
           'SizeX="10"/></Image></OME>')
    assert parse_description(ome) == ((0.25, 0.26), None, "ome")
    philips = '<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028">"0.000227" "0.000226"</Attribute>'
    (mx, my), _, fmt = parse_description(philips)
    assert fmt == "philips" and mx == pytest.approx(0.226) and my == pytest.approx(0.227)
    assert parse_description("ImageJ=1.52\nunit=micron") == (None, None, None)
    assert parse_description("x|MPP = nan|AppMag = -3") == (None, None, None)
