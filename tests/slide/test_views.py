"""Multi-magnification views per tile (issue 17, item 1), pinned on a slide with a known pattern.

The fake slide is 256 x 256 level-0 px at 1 µm/px with levels of downsample 1, 4 and 16. Every
pixel of every level holds R = floor(X), G = floor(Y), B = 100, where (X, Y) is the pixel's centre
in level-0 px: a view's mean R and G are therefore its centre in level-0 px (exactly for crops of
levels 1 and 2, up to rounding after resampling), and single pixels are computable by hand.
Outside the slide a read returns white, as the real readers do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.slide._pixels import level_origin
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.reader import SlideReader
from wsi_cmaf.slide.views import ViewSpec, iter_block_views, read_block_views, tile_centres_level0

SIDE = 256


class PatternSlide:
    """Duck-typed SlideReader over the ramp pattern; counts read_region calls."""

    path = Path("pattern.tiff")
    mpp = (1.0, 1.0)
    level_downsamples = (1.0, 4.0, 16.0)
    level_dimensions = ((SIDE, SIDE), (SIDE // 4, SIDE // 4), (SIDE // 16, SIDE // 16))
    level_count = 3
    level_mpp = SlideReader.level_mpp
    level_for_mpp = SlideReader.level_for_mpp
    _check_level = SlideReader._check_level

    def __init__(self) -> None:
        self.reads: list[tuple[tuple[int, int], int, tuple[int, int]]] = []

    def read_region(self, location, level, size):
        self.reads.append((tuple(location), level, tuple(size)))
        ds = self.level_downsamples[level]
        x0, y0 = level_origin(location, ds)
        w, h = size
        lw, lh = self.level_dimensions[level]
        xs, ys = np.arange(x0, x0 + w), np.arange(y0, y0 + h)
        out = np.full((h, w, 3), 255, np.uint8)
        out[..., 0] = np.floor((xs + 0.5) * ds)[None, :].clip(0, 255)
        out[..., 1] = np.floor((ys + 0.5) * ds)[:, None].clip(0, 255)
        out[..., 2] = 100
        outside = (xs[None, :] < 0) | (xs[None, :] >= lw) | (ys[:, None] < 0) | (ys[:, None] >= lh)
        out[outside] = 255
        return out


# Grid: 8 px tiles at 4 µm/px (level 1, cropped), 4 x 4 tiles per block -> 8 x 8 tiles, 4 blocks.
GRID = GridConfig(mpp=4.0, tile_size=8, block_tiles=4)
SPECS = (ViewSpec(4.0, 8),    # the tile itself
         ViewSpec(16.0, 4),   # 64 µm of context, a crop of level 2
         ViewSpec(8.0, 9))    # 72 µm, level 1 resampled by 2 (not a pyramid level)


@pytest.fixture()
def setup():
    slide = PatternSlide()
    grid = TileGrid.from_slide(slide, GRID)
    assert grid.shape == (8, 8) and grid.level == 1 and grid.exact and len(grid.blocks) == 4
    return slide, grid


def test_tile_centres_by_hand(setup):
    _, grid = setup
    # tile (r, c) covers grid px [8c, 8c + 8) at 4 level-0 px each: centre x = 32c + 16
    centres = tile_centres_level0(grid, np.array([0, 1, 7]), np.array([0, 2, 5]))
    assert centres.tolist() == [[16.0, 16.0], [80.0, 48.0], [176.0, 240.0]]


def test_view_centres_coincide_with_tile_centres(setup):
    slide, grid = setup
    out = read_block_views(slide, grid, None, SPECS, rows=np.array([1, 3, 4]), cols=np.array([2, 3, 5]))
    expected = {(1, 2): (80.0, 48.0), (3, 3): (112.0, 112.0), (4, 5): (176.0, 144.0)}
    for i, key in enumerate(zip(out.rows.tolist(), out.cols.tolist())):
        ex, ey = expected[key]
        for v in (0, 1):  # crops of a level: the mean of floor(pixel centre) is the window centre
            assert not out.missing[i, v]
            view = out.views[v][i].astype(float)
            assert view[..., 0].mean() == ex and view[..., 1].mean() == ey, (key, v)
        # 9 px at 8 µm/px: top-left at centre/8 - 4.5 (a half pixel), rounded up -> centre + 4 µm
        view = out.views[2][i].astype(float)
        assert abs(view[..., 0].mean() - (ex + 4.0)) <= 0.6 and abs(view[..., 1].mean() - (ey + 4.0)) <= 0.6
    # single pixels by hand: tile (1, 2)'s 16 µm/px view starts at level-2 px (80/16 - 2, 48/16 - 2) = (3, 1),
    # whose centre is level-0 (3.5 * 16, 1.5 * 16) = (56, 24)
    assert out.views[1][0, 0, 0].tolist() == [56, 24, 100]
    assert out.views[1][0, 3, 3].tolist() == [56 + 48, 24 + 48, 100]
    # the tile view is the tile: level-1 px (16 .. 23, 8 .. 15) -> R = 4 * 16 + 2 = 66 at its top-left
    assert out.views[0][0, 0, 0].tolist() == [66, 34, 100]


def test_one_read_per_view_and_block(setup):
    slide, grid = setup
    blocks = list(iter_block_views(slide, grid, SPECS))
    assert len(blocks) == 4
    assert len(slide.reads) == 4 * len(SPECS)  # 16 tiles per block, still one read per view spacing
    # the reads of the first block: level 1 (tile views), level 2 (16 µm crops), level 1 (8 µm resampled)
    assert [r[1] for r in slide.reads[:3]] == [1, 2, 1]
    # the 16 µm/px window of block (0, 0) spans the inside views of tiles 1..3: level-2 px 1 .. 2+3+4
    assert slide.reads[1] == ((16, 16), 2, (8, 8))
    assert all(b.views[v].shape == (16, s.size, s.size, 3) for b in blocks for v, s in enumerate(SPECS))


def test_edge_context_is_missing_exactly_when_it_leaves_the_slide(setup):
    slide, grid = setup
    blocks = list(iter_block_views(slide, grid, SPECS, fill=7))
    rows = np.concatenate([b.rows for b in blocks])
    cols = np.concatenate([b.cols for b in blocks])
    missing = np.concatenate([b.missing for b in blocks])
    # tile view: always inside (grid tiles lie inside the slide)
    assert not missing[:, 0].any()
    # 64 µm context centred at 32c + 16: leaves [0, 256) iff 32c + 16 - 32 < 0 or 32c + 16 + 32 > 256,
    # i.e. c == 0 or c == 7 (same for rows)
    edge = (rows == 0) | (rows == 7) | (cols == 0) | (cols == 7)
    assert np.array_equal(missing[:, 1], edge)
    # 72 µm at 8 µm/px: window [8(4c - 2), 8(4c + 7)) = [32c - 16, 32c + 56): leaves iff c == 0 or c == 7
    assert np.array_equal(missing[:, 2], edge)
    views = np.concatenate([b.views[1] for b in blocks])
    assert (views[missing[:, 1]] == 7).all() and not (views[~missing[:, 1]] == 7).all()


def test_context_that_no_tile_can_see_costs_no_read():
    slide = PatternSlide()
    grid = TileGrid.from_slide(slide, GRID)
    # 300 µm of context does not fit anywhere on a 256 µm slide
    out = read_block_views(slide, grid, grid.blocks[0], (ViewSpec(4.0, 8), ViewSpec(16.0, 19)))
    assert out.missing[:, 1].all() and not out.missing[:, 0].any()
    assert len(slide.reads) == 1
    with pytest.raises(ConfigError, match="different sizes"):
        out.stacked()
    same = read_block_views(slide, grid, grid.blocks[0], (ViewSpec(4.0, 8), ViewSpec(16.0, 8)))
    assert same.stacked().shape == (16, 2, 8, 8, 3)


def test_bad_specs_are_named_errors():
    with pytest.raises(ConfigError):
        ViewSpec(0.0, 8)
    with pytest.raises(ConfigError):
        ViewSpec(4.0, 0)
    slide = PatternSlide()
    grid = TileGrid.from_slide(slide, GRID)
    with pytest.raises(ConfigError, match="at least one"):
        read_block_views(slide, grid, grid.blocks[0], ())


def test_on_a_real_pyramidal_tiff(tmp_path):
    from wsi_cmaf.slide.reader import open_slide
    from wsi_cmaf.slide.synthetic import write_synthetic_slide

    info = write_synthetic_slide(tmp_path / "s.tiff", 1024, 768, 1.0, seed=3, tile=256, downsamples=(1, 4))
    with open_slide(info.path) as reader:
        grid = TileGrid.from_slide(reader, GridConfig(mpp=4.0, tile_size=16, block_tiles=8))
        calls = []
        original = reader.read_region

        def counted(*args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

        reader.read_region = counted
        out = read_block_views(reader, grid, grid.blocks[0], (ViewSpec(4.0, 16), ViewSpec(16.0, 16)))
        assert len(calls) == 2
        # the tile view of a cropped grid is the tile as read_block cuts it
        from wsi_cmaf.slide.reads import read_block

        tiles = read_block(reader, grid, grid.blocks[0])
        assert np.array_equal(out.views[0], tiles.tiles)
        # 256 µm of context around tile (r, c) centred at 64c + 32 leaves the slide for c < 2, r < 2
        expect = (out.rows < 2) | (out.cols < 2)
        assert np.array_equal(out.missing[:, 1], expect)


def test_the_tile_view_is_never_missing_even_for_partial_edge_tiles():
    slide = PatternSlide()
    # 12 px tiles at 4 µm/px on 64 target px: 5 whole tiles a side, plus (where the grid pads partial
    # edge tiles) a sixth one 4/12 inside the slide
    grid = TileGrid.from_slide(slide, GridConfig(mpp=4.0, tile_size=12, block_tiles=8))
    out = read_block_views(slide, grid, grid.blocks[0], (ViewSpec(4.0, 12), ViewSpec(4.0, 13)))
    assert not out.missing[:, 0].any()
    # a 13 px view at the same spacing is context, not the tile: the last whole tile's (col 4,
    # centre 4 * 12 + 6 = 54 grid px) spans 47.5 .. 60.5 -> rounds to 48 .. 61 <= 64: inside
    last_whole = (out.cols == 4) & (out.rows < 5)
    assert not out.missing[last_whole, 1].any()
    assert np.array_equal(out.missing[:, 1], (out.cols > 4) | (out.rows > 4))
