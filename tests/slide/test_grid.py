"""Tile grid geometry, tissue fractions and block reads (fake reader + real synthetic slide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_cmaf.cli import main as cli_main
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.slide import TissueMask, detect_tissue, open_slide
from wsi_cmaf.slide.grid import GridConfig, TileGrid, tissue_fractions
from wsi_cmaf.slide.reads import read_block, read_tile
from wsi_cmaf.slide.synthetic import write_synthetic_slide


class CoordReader:
    """Fake SlideReader whose pixels encode their own level coordinates (x, y) exactly."""

    def __init__(self, width: int, height: int, mpp: float = 0.5, downsamples=(1.0, 4.0)):
        self.path = Path("fake.tiff")
        self.mpp = (mpp, mpp)
        self.level_downsamples = tuple(downsamples)
        self.level_dimensions = tuple((int(width // d), int(height // d)) for d in downsamples)
        self.level_count = len(downsamples)
        self.calls: list[tuple] = []

    def level_for_mpp(self, target: float, tolerance: float = 0.05) -> int:
        ok = [i for i, d in enumerate(self.level_downsamples) if self.mpp[0] * d <= target * (1 + tolerance)]
        return max(ok) if ok else 0

    def read_region(self, location, level, size):
        self.calls.append((location, level, size))
        ds = self.level_downsamples[level]
        x0, y0 = int(location[0] / ds), int(location[1] / ds)
        xs = np.arange(x0, x0 + size[0])
        ys = np.arange(y0, y0 + size[1])
        out = np.empty((size[1], size[0], 3), np.uint8)
        out[..., 0] = (xs % 256)[None, :]
        out[..., 1] = (ys % 256)[:, None]
        out[..., 2] = ((xs // 256)[None, :] * 16 + (ys // 256)[:, None]) % 256
        return out


def test_config_validation():
    for bad in (dict(mpp=0), dict(tile_size=0), dict(stride=0), dict(tissue_threshold=1.5), dict(block_tiles=0),
                dict(min_inside_fraction=0.0), dict(min_inside_fraction=1.5)):
        with pytest.raises(ConfigError):
            GridConfig(**bad)
    assert GridConfig(tile_size=50).step == 50 and GridConfig(tile_size=50, stride=25).step == 25


def test_partial_edge_tiles_follow_min_inside_fraction():
    # 4050 x 2030 level-0 px at 0.5 µm/px -> 1012.5 x 507.5 px at 2 µm/px; 50-px tiles.
    reader = CoordReader(4050, 2030)
    whole = TileGrid.from_slide(reader, GridConfig(mpp=2.0, tile_size=50, block_tiles=4, min_inside_fraction=1.0))
    assert whole.shape == (10, 20)  # floor(507.5 / 50), floor(1012.5 / 50): whole tiles only
    assert not whole.partial.any()
    last = read_tile(reader, whole, 9, 19)
    # bottom-right pixel of the last whole tile is level-1 px (999, 499): fully inside the level
    assert tuple(last[-1, -1]) == (999 % 256, 499 % 256, (999 // 256) * 16 + 499 // 256)
    # Default (1/4): the 12.5 px right strip is 12.5 / 50 = 0.25 of a tile -> a 21st column; the
    # 7.5 px bottom strip is 0.15 of a tile -> no 11th row.
    grid = TileGrid.from_slide(reader, GridConfig(mpp=2.0, tile_size=50, block_tiles=4))
    assert grid.shape == (10, 21) and grid.level == 1 and grid.exact
    assert grid.n_block_rows == 3 and grid.n_block_cols == 6
    np.testing.assert_allclose(grid.inside_fraction[:, 20], 0.25)
    assert grid.inside_fraction[:, :20].min() == 1.0 and grid.partial.sum() == 10
    edge = read_tile(reader, grid, 9, 20)
    # columns 0..12 are level px 1000..1012 (pixel 1012 straddles the 1012.5 px edge); 13.. are padding
    assert tuple(edge[0, 12]) == (1012 % 256, 450 % 256, (1012 // 256) * 16 + 450 // 256)
    assert (edge[:, 13:] == 255).all()
    # With overlap: tiles every 30 px -> floor((1012.5 - 50) / 30) + 1 = 33 whole columns, covering
    # 1010 px; the 34th starts at 990 with 22.5 / 50 = 0.45 inside. Rows: 16 whole cover 500 px,
    # the 17th starts at 480 with 27.5 / 50 = 0.55 inside.
    assert TileGrid.grid_shape((4050, 2030), (0.5, 0.5), GridConfig(mpp=2.0, tile_size=50, stride=30)) == (17, 34)
    assert TileGrid.grid_shape((4050, 2030), (0.5, 0.5),
                               GridConfig(mpp=2.0, tile_size=50, stride=30, min_inside_fraction=1.0)) == (16, 33)


def test_block_tiles_land_where_they_should_and_one_read_per_block():
    reader = CoordReader(8000, 6000)
    mask = np.zeros((60, 80), bool)  # 50 µm/px mask over 4000 x 3000 µm
    mask[10:30, 20:50] = True
    grid = TileGrid.from_slide(reader, GridConfig(mpp=2.0, tile_size=50, block_tiles=4), TissueMask(mask, 50.0))
    assert grid.tissue.any() and not grid.tissue.all()
    reader.calls.clear()
    seen = 0
    for block in grid.blocks:
        bt = read_block(reader, grid, block)
        assert len(bt.tiles) == grid.tissue[block.rows, block.cols].sum() > 0
        for tile, r, c in zip(bt.tiles, bt.rows, bt.cols):
            # level-1 px of the tile's top-left are (c * 50, r * 50); pixels encode coordinates
            assert tile[0, 0, 0] == (c * 50) % 256 and tile[0, 0, 1] == (r * 50) % 256
            assert tile[0, 0, 2] == ((c * 50) // 256 * 16 + (r * 50) // 256) % 256
            x, y = grid.tile_location(r, c)
            assert (x, y) == (c * 200, r * 200)  # level-0 px (0.5 -> 2 µm/px is x4)
            seen += 1
    assert seen == grid.n_tissue
    assert len(reader.calls) == len(grid.blocks)  # ONE read per block with tissue, none for the rest
    empty = [(by, bx) for by in range(grid.n_block_rows) for bx in range(grid.n_block_cols)
             if not grid.tissue[by * 4:(by + 1) * 4, bx * 4:(bx + 1) * 4].any()]
    assert empty and not {b.index for b in grid.blocks} & set(empty)


def test_stride_overlap_tiles_share_pixels():
    reader = CoordReader(4000, 4000)
    grid = TileGrid.from_slide(reader, GridConfig(mpp=2.0, tile_size=50, stride=20, block_tiles=8))
    bt = read_block(reader, grid, grid.blocks[0])
    tiles = {(int(r), int(c)): t for t, r, c in zip(bt.tiles, bt.rows, bt.cols)}
    np.testing.assert_array_equal(tiles[(0, 0)][:, 20:], tiles[(0, 1)][:, :30])
    np.testing.assert_array_equal(tiles[(0, 0)][20:], tiles[(1, 0)][:30])


@pytest.mark.parametrize("shape", [(12, 17), (20, 26)])  # inside the mask; past its bottom/right edge
def test_tissue_fraction_is_exact_area(shape):
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31)) > 0.6
    mask_mpp, tile_mpp, tile, stride = 6.0, 1.5, 6, 5  # tiles cover 9 µm = 1.5 mask px
    got = tissue_fractions(mask, (mask_mpp, mask_mpp), tile_mpp, tile, stride, shape)
    fine = np.kron(mask, np.ones((4, 4))).astype(float)  # 1.5 µm per fine px: tiles are whole px
    fine = np.pad(fine, ((0, 20), (0, 20)))  # beyond the mask there is no tissue
    want = np.array([[fine[r * stride:r * stride + tile, c * stride:c * stride + tile].mean()
                      for c in range(shape[1])] for r in range(shape[0])])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_threshold_and_no_mask():
    reader = CoordReader(2000, 2000)
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half at 100 µm/px
    cfg = GridConfig(mpp=2.0, tile_size=50, tissue_threshold=0.5)
    grid = TileGrid.from_slide(reader, cfg, TissueMask(mask, 100.0))
    frac = grid.tissue_fraction
    np.testing.assert_array_equal(grid.tissue, frac >= 0.5)
    assert frac[:, :5].min() == 1.0 and frac[:, 5:].max() == 0.0
    all_tiles = TileGrid.from_slide(reader, cfg, None)
    assert all_tiles.tissue.all() and len(all_tiles.blocks) == all_tiles.n_block_rows * all_tiles.n_block_cols


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("grid") / "g.tiff", 4096, 4096, seed=21, tile=256)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_block_equals_per_tile_reads_exact_level(synthetic, backend):
    with open_slide(synthetic.path, backend=backend) as r:
        grid = TileGrid.from_slide(r, GridConfig(mpp=1.0, tile_size=50, block_tiles=8), detect_tissue(r))
        assert grid.exact and grid.level == 1 and len(grid.blocks) >= 2
        for block in grid.blocks[:4]:
            bt = read_block(r, grid, block)
            for tile, row, col in zip(bt.tiles, bt.rows, bt.cols):
                ref = r.read_region(grid.tile_location(row, col), grid.level, (50, 50))
                np.testing.assert_array_equal(tile, ref)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_block_matches_per_tile_reads_when_resizing(synthetic, backend):
    """Level 1 is 1 µm/px; 2.7 µm/px tiles of 33 px start at fractional level px: resampled."""
    with open_slide(synthetic.path, backend=backend) as r:
        grid = TileGrid.from_slide(r, GridConfig(mpp=2.7, tile_size=33, block_tiles=6), detect_tissue(r))
        assert not grid.exact and grid.level == 1
        diffs = []
        for block in grid.blocks[:3]:
            bt = read_block(r, grid, block)
            assert bt.tiles.shape[1:] == (33, 33, 3)
            for tile, row, col in zip(bt.tiles, bt.rows, bt.cols):
                diffs.append(np.abs(tile.astype(int) - read_tile(r, grid, row, col)).astype(float))
        diffs = np.stack(diffs)
        assert diffs.mean() < 1.0 and diffs.max() <= 8
        # ... and a resampled tile really is its level-1 footprint (89.1 px) scaled to 33 px
        from skimage.transform import resize

        tile, row, col = bt.tiles[0], int(bt.rows[0]), int(bt.cols[0])
        x0, y0 = round(col * 33 * 2.7), round(row * 33 * 2.7)
        raw = r.read_region((x0 * 4, y0 * 4), 1, (89, 89))
        ref = resize(raw, (33, 33, 3), order=1, anti_aliasing=True, preserve_range=True)
        assert np.abs(tile - ref).mean() < 6


def test_cli_tiles_with_preview(synthetic, tmp_path, capsys):
    png = tmp_path / "preview.png"
    rc = cli_main(["tiles", str(synthetic.path), "--mpp", "4.0", "--size", "16", "--block-tiles", "8",
                   "--preview", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tissue tiles:" in out and "blocks:" in out
    assert png.is_file() and png.stat().st_size > 10_000


def test_read_planning_trades_calls_against_pixels():
    from wsi_cmaf.slide.reads import plan_reads

    # Two tissue islands in opposite corners of a 32 x 32 block.
    rows = np.array([0, 0, 1, 30, 31, 31])
    cols = np.array([0, 1, 0, 30, 30, 31])
    # Calls dearer than decoding the whole 1600 x 1600 px block: one bounding box.
    assert plan_reads(rows, cols, 50, 50, 5_000_000) == [(0, 31, 0, 31)]
    # Two nearby islands with tiffslide's ~200k px call cost: still one read.
    assert plan_reads(np.array([0, 2]), np.array([0, 2]), 50, 50, 200_000) == [(0, 2, 0, 2)]
    # Cheap calls (OpenSlide-like): one strip per island, glass between them never decoded.
    strips = plan_reads(rows, cols, 50, 50, 2_000)
    assert 2 <= len(strips) <= len(np.unique(rows))
    assert all(r1 <= 1 or r0 >= 30 for r0, r1, _, _ in strips)  # no strip spans the glass
    decoded = sum(((r1 - r0) * 50 + 50) * ((c1 - c0) * 50 + 50) for r0, r1, c0, c1 in strips)
    assert decoded <= 8 * 50 * 50
    # Every tissue tile lies in exactly one strip.
    for r, c in zip(rows, cols):
        assert sum(r0 <= r <= r1 and c0 <= c <= c1 for r0, r1, c0, c1 in strips) == 1


def test_strip_reads_give_the_same_tiles_as_one_read():
    reader = CoordReader(8000, 6000)
    mask = np.zeros((60, 80), bool)
    mask[5:12, 5:10] = True
    mask[40:50, 60:75] = True
    grid = TileGrid.from_slide(reader, GridConfig(mpp=2.0, tile_size=50, block_tiles=32), TissueMask(mask, 50.0))
    one = [read_block(reader, grid, b) for b in grid.blocks]
    reader.calls.clear()
    reader.call_overhead_px = 100  # cheap calls: the planner splits sparse blocks
    split = [read_block(reader, grid, b) for b in grid.blocks]
    assert len(reader.calls) > len(grid.blocks)
    for a, b in zip(one, split):
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.cols, b.cols)
        assert np.array_equal(a.tiles, b.tiles)


def test_block_backend_choice_reads_the_same_pixels(synthetic, tmp_path):
    from wsi_cmaf.slide.reads import block_read_backend

    with open_slide(synthetic.path, backend="openslide") as a, open_slide(synthetic.path, backend="tiffslide") as b:
        assert block_read_backend(a) == "tiffslide" and block_read_backend(b) == "tiffslide"
        grid = TileGrid.from_slide(a, GridConfig(mpp=1.0, tile_size=50, block_tiles=8), detect_tissue(a))
        for block in grid.blocks[:4]:
            np.testing.assert_array_equal(read_block(a, grid, block).tiles, read_block(b, grid, block).tiles)
    # A file tiffslide cannot read keeps the opening backend.
    class Fake:
        backend, path = "openslide", tmp_path / "not-a-tiff.mrxs"
    Fake.path.write_text("x")
    assert block_read_backend(Fake()) == "openslide"
