"""Bad input (issue §7): each case gives a named error naming the path; nothing hangs or crashes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers.slides import make_image
from wsi_cmaf.cli import main
from wsi_cmaf.errors import (
    MissingResolutionError,
    NotASlideFileError,
    SlideNotFoundError,
    UnreadableSlideError,
    UnsupportedSlideError,
    WsiCmafError,
)
from wsi_cmaf.slide import open_slide

REPO = Path(__file__).resolve().parents[2]


def _run_isolated(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter: a segfault or hang there cannot take pytest down."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_nonexistent_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.svs"
    with pytest.raises(SlideNotFoundError, match="nope.svs"):
        open_slide(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(NotASlideFileError, match="directory"):
        open_slide(tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.touch()
    with pytest.raises(NotASlideFileError, match="empty"):
        open_slide(path)


def test_text_file_named_svs(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n" * 20)
    with pytest.raises(UnreadableSlideError) as exc:
        open_slide(path)
    msg = str(exc.value)
    assert str(path) in msg and "openslide" in msg and "tiffslide" in msg
    with pytest.raises(UnreadableSlideError, match="backend openslide"):
        open_slide(path, backend="openslide")


@pytest.mark.realdata
def test_truncated_real_svs(real_slide, tmp_path: Path) -> None:
    src = real_slide("svs")
    cut = tmp_path / "cut.svs"
    shutil.copy(src, cut)
    cut.chmod(0o644)
    with open(cut, "r+b") as fh:
        fh.truncate(src.stat().st_size // 2)  # level-0 directory lies at ~66 %: it is gone
    with pytest.raises(UnreadableSlideError) as exc:
        open_slide(cut)
    assert str(cut) in str(exc.value)


@pytest.mark.realdata
def test_truncated_tiff_fails_on_read_not_crash(real_slide, tmp_path: Path) -> None:
    # The generic TIFF keeps its directories at the front: it still opens when cut, and the
    # missing tiles must surface as UnreadableSlideError at read time. Run in a subprocess
    # with a timeout to prove there is no crash or hang.
    src = real_slide("tiff")
    cut = tmp_path / "cut.tiff"
    shutil.copy(src, cut)
    cut.chmod(0o644)
    with open(cut, "r+b") as fh:
        fh.truncate(600_000)
    proc = _run_isolated(f"""
        from wsi_cmaf.errors import UnreadableSlideError
        from wsi_cmaf.slide import open_slide
        r = open_slide({str(cut)!r})
        top = r.read_region((0, 0), 0, (512, 256))  # data before the cut: fine
        assert top.std() > 1
        try:
            r.read_region((0, 0), 0, r.level_dimensions[0])
        except UnreadableSlideError as exc:
            assert {str(cut)!r} in str(exc)
            print("OK", r.backend)
        else:
            print("NO ERROR")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("OK")


def test_plain_non_tiled_tiff_reads_correctly(tmp_path: Path) -> None:
    img = make_image(640, 480)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, img, photometric="rgb", resolution=(20_000, 20_000),
                     resolutionunit="CENTIMETER", metadata=None)
    with open_slide(path) as r:
        assert r.level_dimensions == ((640, 480),)
        assert r.mpp == pytest.approx((0.5, 0.5)) and r.mpp_source == "tiff-resolution"
        np.testing.assert_array_equal(r.read_region((10, 20), 0, (300, 200)), img[20:220, 10:310])


def test_16bit_greyscale_tiff_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "grey16.tif"
    data = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)
    tifffile.imwrite(path, data, tile=(128, 128), photometric="minisblack")
    for backend in ("auto", "openslide", "tiffslide"):
        with pytest.raises(UnsupportedSlideError) as exc:
            open_slide(path, backend=backend)
        assert str(path) in str(exc.value) and "uint16" in str(exc.value)


@pytest.mark.realdata
def test_missing_resolution_without_override(real_slide) -> None:
    path = real_slide("jp2k_svs")
    reader = open_slide(path)
    with pytest.raises(MissingResolutionError) as exc:
        reader.level_for_mpp(4.0)
    assert str(path) in str(exc.value) and "mpp=" in str(exc.value)
    reader.close()


def test_every_error_is_a_wsicmaf_error() -> None:
    for cls in (SlideNotFoundError, NotASlideFileError, UnreadableSlideError,
                UnsupportedSlideError, MissingResolutionError):
        assert issubclass(cls, WsiCmafError)


def test_cli_info_prints_one_line_and_exits_nonzero(tmp_path: Path, capsys) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("not a slide")
    assert main(["info", str(path)]) == 1  # a file that is not a slide: runtime error (exit 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wsi-cmaf info: error:") and str(path) in err[0]
    assert main(["info", str(tmp_path / "missing.svs")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_info_subprocess_no_traceback_unless_debug(tmp_path: Path) -> None:
    path = tmp_path / "empty.svs"
    path.touch()
    plain = subprocess.run([sys.executable, "-m", "wsi_cmaf", "info", str(path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0
    assert "Traceback" not in plain.stderr and "empty" in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "wsi_cmaf", "info", "--debug", str(path)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cli_info_reports_slide(tmp_path: Path, capsys) -> None:
    from tests.helpers.slides import write_tiff_slide

    img = np.full((1024, 1024, 3), 245, np.uint8)
    img[200:800, 300:700] = (220, 140, 190)
    path = write_tiff_slide(tmp_path / "s.svs", img, mpp=0.5, app_mag=20, downsamples=(1, 4))
    assert main(["info", str(path), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "openslide" and info["mpp_source"] == "vendor"
    assert info["objective_power"] == 20 and len(info["levels"]) == 2
    assert info["tissue_fraction"] == pytest.approx(600 * 400 / 1024**2, abs=0.03)
    assert main(["info", str(path), "--backend", "tiffslide", "--mpp", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "tiffslide" in out and "override" in out and "0.3" in out
