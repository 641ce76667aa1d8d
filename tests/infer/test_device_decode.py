"""Device-side JPEG decoding (``decode="device"``) on the CPU: pixels, probabilities, faults, identity.

Tolerances, measured on this project's files (torchvision's CPU decoder and tifffile's codec are
both libjpeg-turbo):

* raw storage tiles decoded by ``decode_jpeg`` against tifffile's own decode: exact (max 0), on the
  real Aperio SVS (RGB-coded JPEG with the APP14 splice), the real YCbCr pyramid TIFF and synthetic
  slides.
* block tiles against the CPU block reads: exact for crops and level-0 regions; for resized grids
  the on-device copy of Pillow's bilinear resize was exact on these slides, and is allowed 1 grey
  level (Pillow 13 picks the order of its two passes itself in a way not reproduced; random windows
  differ by at most 1 where it differs).
* probabilities of ``analyze_slide(decode="device")`` against the default path: within 1e-4 (the
  compiled-model tolerance of tests/models/test_fast_paths.py); measured 0.0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from tests.helpers.models import DarknessClassifier, tiny_config
from tests.helpers.slides import corrupt
from wsi_cmaf.errors import ConfigError, StoreMismatchError
from wsi_cmaf.infer import InferenceConfig, analyze_slide
from wsi_cmaf.infer.dask_tasks import PartialBlock, SlideSpec, read_block_task
from wsi_cmaf.infer.device_decode import JpegSource, decode_identity, plan_decode, read_jpeg_block_task
from wsi_cmaf.infer.device_windows import pil_bilinear
from wsi_cmaf.slide import GridConfig, TileGrid, detect_tissue, open_slide, write_synthetic_slide
from wsi_cmaf.slide.jpeg_tiles import ADOBE_RGB, JpegTileReader, NotJpegTiledError, complete_stream, jpeg_level
from wsi_cmaf.slide.reads import read_block

CFG = dict(block_tiles=4, progress=False, batch_size=64, overlay=False, geojson=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """0.5 µm/px, levels 0.5 / 2 / 8 µm/px, 256 px JPEG tiles (YCbCr)."""
    d = tmp_path_factory.mktemp("devdecode")
    return write_synthetic_slide(d / "s.svs", width=3000, height=2000, mpp=0.5, tile=256,
                                 downsamples=(1, 4, 16), seed=3, save_mask=False).path


def _raw_vs_tifffile(path: Path) -> tuple[int, int]:
    """(tiles compared, max abs difference) of decode_jpeg on our streams vs tifffile, every level."""
    from torchvision.io import ImageReadMode, decode_jpeg

    n, worst = 0, 0
    with tifffile.TiffFile(path) as tif:
        levels = {i: lv.asarray() for i, lv in enumerate(tif.series[0].levels) if lv.keyframe.compression == 7}
    reader = JpegTileReader(path)
    for i, want in levels.items():
        info = jpeg_level(path, i, (want.shape[1], want.shape[0]))
        for k, stream in enumerate(reader.read(info, list(range(info.across * info.down)))):
            if stream is None:  # a tile the file does not store
                continue
            x, y, w, h = info.tile_box(k)
            got = decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8), mode=ImageReadMode.RGB)
            got = got.permute(1, 2, 0).numpy()
            assert got.shape == (*info.tile[::-1], 3)
            worst = max(worst, int(np.abs(got[:h, :w].astype(int) - want[y:y + h, x:x + w].astype(int)).max()))
            n += 1
    reader.close()
    return n, worst


@pytest.mark.realdata
@pytest.mark.parametrize("key", ["svs", "tiff"])
def test_raw_tiles_decode_like_tifffile_on_real_slides(real_slide, key):
    n, worst = _raw_vs_tifffile(real_slide(key))
    print(f"{key}: {n} tiles, max abs difference {worst}")
    assert n > 0 and worst == 0


def test_raw_tiles_decode_like_tifffile_on_synthetic(synth):
    n, worst = _raw_vs_tifffile(synth)
    assert n == 96 + 6 + 1 and worst == 0  # 12x8 + 3x2 + 1x1 storage tiles


def test_complete_stream_splices_tables_and_marks_rgb_once():
    tables = b"\xff\xd8TABLES\xff\xd9"
    tile = b"\xff\xd8\xff\xdaDATA\xff\xd9"
    assert complete_stream(tile, tables, rgb=False) == b"\xff\xd8TABLES\xff\xdaDATA\xff\xd9"
    rgb = complete_stream(tile, None, rgb=True)
    assert rgb == b"\xff\xd8" + ADOBE_RGB + b"\xff\xdaDATA\xff\xd9"
    assert complete_stream(rgb, None, rgb=True) == rgb  # already marked: not twice


def test_levels_that_are_not_jpeg_tiles_are_refused_by_name(tmp_path, synth):
    raw = tmp_path / "raw.tiff"
    tifffile.imwrite(raw, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(NotJpegTiledError, match="not JPEG-compressed"):
        jpeg_level(raw, 0)
    with pytest.raises(NotJpegTiledError, match="pyramid level"):
        jpeg_level(synth, 7)
    with pytest.raises(NotJpegTiledError, match="in the slide reader"):
        jpeg_level(synth, 0, (10, 10))
    with pytest.raises(ConfigError, match="decode must be"):
        InferenceConfig(decode="gpu")


def _block_diffs(path: Path, gcfg: GridConfig) -> tuple[int, int]:
    """(tiles, max abs difference) of device-decoded (CPU) block tiles against read_block."""
    n, worst = 0, 0
    with open_slide(path, backend="tiffslide") as r:
        grid = TileGrid.from_slide(r, gcfg, detect_tissue(r))
        src = JpegSource(jpeg_level(path, grid.level, r.level_dimensions[grid.level]), float(r.call_overhead_px), True)
        for b in grid.blocks:
            ref, got = read_block(r, grid, b), read_jpeg_block_task(src, grid, b)
            assert type(got).__name__ == "BlockTiles"
            np.testing.assert_array_equal(got.rows, ref.rows)
            worst = max(worst, int(np.abs(got.tiles.astype(int) - ref.tiles.astype(int)).max()))
            n += len(ref.tiles)
    return n, worst


@pytest.mark.parametrize(("gcfg", "limit"), [
    (GridConfig(mpp=2.0, tile_size=50, block_tiles=8), 0),  # crop of level 1
    (GridConfig(mpp=4.0, tile_size=50, block_tiles=8), 1),  # level 1 resized by 2
    (GridConfig(mpp=0.6, tile_size=100, source="level0", block_tiles=4), 0),  # level-0 regions
])
def test_block_tiles_match_the_cpu_block_reads(synth, gcfg, limit):
    n, worst = _block_diffs(synth, gcfg)
    assert n > 0 and worst <= limit


@pytest.mark.realdata
def test_block_tiles_match_on_the_real_svs(real_slide):
    n, worst = _block_diffs(real_slide("svs"), GridConfig(mpp=4.0, tile_size=50, block_tiles=8))
    print(f"real SVS resized blocks: {n} tiles, max abs difference {worst}")
    assert n > 0 and worst <= 1


def test_pil_bilinear_is_pillow_within_one_level():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    box = (1.25, 0.75, 61.5, 80.0)
    want = np.asarray(Image.fromarray(a).resize((24, 30), Image.Resampling.BILINEAR, box=box)).astype(int)
    got = pil_bilinear(torch.from_numpy(a), box, (24, 30)).numpy().astype(int)
    assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.05
    flat = np.full((40, 40, 3), 77, np.uint8)  # a constant stays exactly constant
    assert (pil_bilinear(torch.from_numpy(flat), (0.5, 0.5, 39.0, 39.0), (13, 13)).numpy() == 77).all()


def _run(path: Path, out: Path, **kw):
    return analyze_slide(path, model=DarknessClassifier(), model_config=tiny_config(), out=out,
                         config=InferenceConfig(**{**CFG, **kw}))


def _probs(res) -> np.ndarray:
    return np.asarray(zarr.open_group(str(res.store), mode="r")["0"])


def test_analyze_with_device_decode_matches_and_refuses_the_other_decoder(synth, tmp_path):
    cpu = _run(synth, tmp_path / "cpu")
    dev = _run(synth, tmp_path / "dev", decode="device")
    a, b = _probs(cpu), _probs(dev)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.isfinite(a).sum() == 2 * cpu.tiles_tissue > 0
    assert np.nanmax(np.abs(a - b)) <= 1e-4
    ident = zarr.open_group(str(dev.store), mode="r").attrs["wsi_cmaf"]["identity"]
    assert ident["decoder"] == "device:cpu"
    with pytest.raises(StoreMismatchError, match="decoder"):  # a CPU-decoded store is not resumed
        _run(synth, tmp_path / "cpu", decode="device")
    with pytest.raises(StoreMismatchError, match="decoder"):
        _run(synth, tmp_path / "dev")


def test_slides_without_jpeg_tiles_fall_back_to_the_cpu(tmp_path, caplog):
    raw = tmp_path / "raw.tiff"
    tifffile.imwrite(raw, np.full((400, 400, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    with open_slide(raw, backend="tiffslide") as r, caplog.at_level("INFO", logger="wsi_cmaf.infer.device_decode"):
        plan = plan_decode(r, GridConfig(), InferenceConfig(decode="device"), torch.device("cpu"))
    assert plan is None and decode_identity(plan) == {}
    assert any("decoded on the CPU" in rec.getMessage() for rec in caplog.records)


def test_decode_jpeg_raises_on_the_fault_fixture(synth, tmp_path):
    from torchvision.io import decode_jpeg

    bad, (tile,) = corrupt(synth, tmp_path / "bad.svs", 1)
    info = jpeg_level(bad, 1)
    (stream,) = JpegTileReader(bad).read(info, [tile])
    with pytest.raises(RuntimeError, match="0x3f"):
        decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8))


@pytest.mark.parametrize("mpp", [2.0, 4.0])  # a crop of level 1, and level 1 resized by 2
def test_corrupt_tiles_are_isolated_as_on_the_cpu_path(synth, tmp_path, mpp):
    bad, (tile,) = corrupt(synth, tmp_path / "bad.svs", 1)
    gcfg = GridConfig(mpp=mpp, tile_size=50, block_tiles=4)
    with open_slide(bad, backend="tiffslide") as r:
        grid = TileGrid.from_slide(r, gcfg, detect_tissue(r))
        src = JpegSource(jpeg_level(bad, 1, r.level_dimensions[1]), float(r.call_overhead_px), True)
        spec = SlideSpec(str(bad), "tiffslide", None)
        partial = 0
        for b in grid.blocks:
            ref, got = read_block_task(spec, grid, b), read_jpeg_block_task(src, grid, b)
            assert type(got) is type(ref)
            np.testing.assert_array_equal(got.rows, ref.rows)
            if len(ref.tiles):
                assert np.abs(got.tiles.astype(int) - ref.tiles.astype(int)).max() <= (0 if mpp == 2.0 else 1)
            if isinstance(ref, PartialBlock):
                partial += 1
                np.testing.assert_array_equal(got.failed_rows, ref.failed_rows)
                np.testing.assert_array_equal(got.failed_cols, ref.failed_cols)
                assert "0x3f" in got.reason
    assert partial >= 1
    if mpp == 4.0:  # end to end (the model's grid): the same failed tiles in the store, the rest as if clean
        cpu, dev = _run(bad, tmp_path / "cpu"), _run(bad, tmp_path / "dev", decode="device")
        failed = [np.asarray(zarr.open_group(str(x.store), mode="r")["wsi_cmaf/failed_tiles"]) for x in (cpu, dev)]
        np.testing.assert_array_equal(failed[0], failed[1])
        assert dev.tiles_failed == cpu.tiles_failed > 0 and dev.blocks_failed == 0
        ok = np.isfinite(_probs(cpu))
        np.testing.assert_array_equal(ok, np.isfinite(_probs(dev)))
        assert np.abs(_probs(cpu)[ok] - _probs(dev)[ok]).max() <= 1e-4
