"""Tile-level fault isolation in the thumbnail / tissue stage, and size limits on user numbers.

Fixtures are built here: a small synthetic Aperio-style pyramid (levels 2048², 512², 128² px at
0.5 / 2 / 8 µm/px, 256 px JPEG tiles) with chosen tiles made undecodable by turning byte 3 of
the tile's JPEG stream (the APP0 marker type) into 0x3F: libjpeg then stops with "Unsupported
marker type 0x3f" in both OpenSlide and imagecodecs, the error the issue reports.

Fault classes covered: one or several undecodable JPEG tiles at level 0, at a reduced level
and at the level the tissue stage reads; a level with no decodable tile; an OpenSlide handle
left in its error state by a failed read; thumbnails, regions and grids sized by implausible
numbers.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_cmaf.errors import (
    ConfigError,
    NoDecodableTissueError,
    RequestTooLargeError,
    UnreadableSlideError,
    WsiCmafError,
)
from wsi_cmaf.slide import GridConfig, TileGrid, TissueConfig, detect_tissue, open_slide, write_synthetic_slide

BACKENDS = ("openslide", "tiffslide")


@pytest.fixture(scope="module")
def clean_slide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    return write_synthetic_slide(d / "clean.svs", width=2048, height=2048, mpp=0.5, tile=256,
                                 downsamples=(1, 4, 16), seed=5, save_mask=False).path


def corrupt_tiles(src: Path, dst: Path, level: int, tiles: list[int]) -> Path:
    """Copy ``src`` to ``dst`` and make tiles (row-major indices) of pyramid ``level`` undecodable."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tf:
        page = tf.series[0].levels[level].pages[0]
        offsets = [page.dataoffsets[i] for i in tiles]
    with open(dst, "r+b") as fh:
        for off in offsets:
            fh.seek(off + 2)
            assert fh.read(2) == b"\xff\xe0"  # APP0 marker right after SOI
            fh.seek(off + 3)
            fh.write(b"\x3f")
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("level", "tile", "mpp", "box"), [
    # level, tile index, thumbnail µm/px that reads that level, bad box in thumbnail px (y0, y1, x0, x1)
    (0, 9, 0.5, (256, 512, 256, 512)),    # 8 tiles across: index 9 = row 1, col 1
    (1, 3, 2.0, (256, 512, 256, 512)),    # 2 tiles across: index 3 = row 1, col 1
    (0, 63, 1.0, (896, 1024, 896, 1024)),  # last tile of level 0, thumbnail reduces it 2x
])
def test_bad_tile_is_background_counted_and_named(clean_slide, tmp_path, caplog, backend, level, tile, mpp, box):
    bad = corrupt_tiles(clean_slide, tmp_path / "bad.svs", level, [tile])
    with open_slide(clean_slide, backend=backend) as r:
        ref = np.asarray(r.thumbnail(mpp))
    with open_slide(bad, backend=backend) as r, caplog.at_level(logging.WARNING):
        thumb = r.thumbnail(mpp)
        assert thumb.level == level
        assert len(thumb.failed_tiles) == 1
        f = thumb.failed_tiles[0]
        ds = 4 ** level
        row, col = divmod(tile, 2048 // ds // 256)
        assert f.location == (col * 256 * ds, row * 256 * ds) and f.size == (256 * ds, 256 * ds)
        assert "0x3f" in f.reason
        y0, y1, x0, x1 = box
        assert (np.asarray(thumb)[y0:y1, x0:x1] == 255).all()  # painted as background
        outside = np.ones(ref.shape[:2], bool)
        outside[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False  # Lanczos/box edge
        np.testing.assert_array_equal(np.asarray(thumb)[outside], ref[outside])
        # the handle stays usable (OpenSlide's error state is sticky until it is reopened)
        assert r.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)
    msg = " ".join(rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING)
    assert "1 undecodable tile(s)" in msg and f"({f.location[0]}, {f.location[1]})" in msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_tissue_mask_carries_failures_and_only_all_bad_is_fatal(clean_slide, tmp_path, backend):
    bad = corrupt_tiles(clean_slide, tmp_path / "bad1.svs", 1, [0, 2])
    with open_slide(bad, backend=backend) as r:
        mask = detect_tissue(r, TissueConfig(mpp=2.0))
        assert mask.n_failed_tiles == 2
        assert [t.location for t in mask.failed_tiles] == [(0, 0), (0, 1024)]
        assert [t.to_dict()["width"] for t in mask.failed_tiles] == [1024, 1024]
        assert not mask.mask[:128, :128].any() and mask.mask.any()
        # the 8 µm/px level (one 128 px tile) is intact: the default tissue stage sees nothing wrong
        assert detect_tissue(r).n_failed_tiles == 0
    dead = corrupt_tiles(clean_slide, tmp_path / "bad2.svs", 2, [0])  # the only tile of level 2
    with open_slide(dead, backend=backend) as r:
        with pytest.raises(NoDecodableTissueError) as exc:
            detect_tissue(r)
        assert isinstance(exc.value, UnreadableSlideError) and str(dead) in str(exc.value)
        assert "level 2" in str(exc.value) and "0x3f" in str(exc.value)


def test_thumbnail_is_still_a_plain_array(clean_slide):
    with open_slide(clean_slide) as r:
        thumb = r.thumbnail(8.0)
    assert isinstance(thumb, np.ndarray) and thumb.failed_tiles == () and thumb.dtype == np.uint8
    assert type(np.asarray(thumb)) is np.ndarray and thumb.shape == (128, 128, 3)
    import pickle

    assert type(pickle.loads(pickle.dumps(thumb))) is np.ndarray


# --- implausible numbers: named errors, no allocation in proportion to them ---------------
def test_implausible_sizes_are_named_errors(clean_slide):
    with open_slide(clean_slide) as r:
        with pytest.raises(RequestTooLargeError, match="thumbnail at 0.001 µm/px"):
            r.thumbnail(0.001)  # 1,000,000² px
        with pytest.raises(RequestTooLargeError, match="larger than the 268 Mpx"):
            r.read_region((0, 0), 0, (100_000, 100_000))
        with pytest.raises(ValueError):
            r.thumbnail(float("nan"))
        with pytest.raises(RequestTooLargeError, match="over the limit of 16,777,216"):
            TileGrid.from_slide(r, GridConfig(mpp=0.05, tile_size=1))
    assert issubclass(RequestTooLargeError, (ConfigError, ValueError, WsiCmafError))
    # 100 µm/px is plausible, but a 8 µm/px thumbnail of this slide at that scale would be
    # 25,600² px (655 Mpx): a named error, where it used to be a bare MemoryError
    with open_slide(clean_slide, mpp=100.0) as r, pytest.raises(RequestTooLargeError, match="655 Mpx"):
        r.thumbnail(8.0)
