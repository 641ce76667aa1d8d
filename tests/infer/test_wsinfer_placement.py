"""Level-0 tiles sit where WSInfer 0.6.1 puts its patches: corners ``k * round(pitch)``.

WSInfer (``wsinfer/patchlib/__init__.py``) computes one patch size ``P = round(patch_size_pixels
* spacing_um_px / m)`` in level-0 px, with ``m`` the mean of the slide's x and y µm/px, and steps
by ``P``: patch k starts at ``k * P``. Every number below is worked out by hand in the comments.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.wsinfer import IMAGENET_MEAN, IMAGENET_STD, analyze_on_lattice, zoo_folder
from wsi_cmaf.errors import ConfigError, StoreFormatError
from wsi_cmaf.slide.grid import GridConfig, TileGrid
from wsi_cmaf.slide.level0 import level0_tile_px, wsinfer_level0_px
from wsi_cmaf.slide.reads import read_tile

CMU = Path(__file__).resolve().parents[3] / "shared" / "data" / "slides" / "cmu_small_region.svs"
PROB_TOL = 0.005  # the bound on probabilities
#: GridConfig's fields, the same for both sources: a store's identity lists exactly these
PYRAMID_CONFIG_KEYS = ["mpp", "tile_size", "stride", "tissue_threshold", "block_tiles", "mpp_tolerance",
                       "source", "min_inside_fraction"]


def _grid(tile: int, mpp: float, slide_mpp: tuple[float, float], size0: tuple[int, int],
          source: str, stride: int | None = None) -> TileGrid:
    cfg = GridConfig(mpp=mpp, tile_size=tile, stride=stride, source=source, block_tiles=8)
    shape = TileGrid.grid_shape(size0, slide_mpp, cfg)
    return TileGrid(cfg, 0, 1.0, slide_mpp, size0, np.ones(shape, np.float32))


def test_patch_and_stride_in_level0_px_by_hand() -> None:
    # 224 px at 0.5 µm/px on 0.499 µm/px: 224 * 0.5 / 0.499 = 224.4489 -> P = 224, S = P
    assert wsinfer_level0_px(224, 0.5, (0.499, 0.499)) == (224, 224)
    assert level0_tile_px(224, 0.5, (0.499, 0.499)) == (224, 224)
    # 50 px at 4 µm/px on 0.499 µm/px: 200 / 0.499 = 400.8016 -> 401
    assert wsinfer_level0_px(50, 4.0, (0.499, 0.499)) == (401, 401)
    # Python's round, as WSInfer's: 5 * 0.5 / 1 = 2.5 -> 2 (half to even); 7 * 0.5 = 3.5 -> 4
    assert wsinfer_level0_px(5, 0.5, (1.0, 1.0)) == (2, 2)
    assert wsinfer_level0_px(7, 0.5, (1.0, 1.0)) == (4, 4)
    # non-square pixels: WSInfer uses the mean, (0.25 + 0.26) / 2 = 0.255; 112 / 0.255 = 439.2157 -> 439
    assert wsinfer_level0_px(224, 0.5, (0.25, 0.26)) == (439, 439)
    # overlap: stride 112 of 224 is WSInfer's overlap 0.5: round(0.5 * 224) = 112
    assert wsinfer_level0_px(224, 0.5, (0.499, 0.499), step=112) == (224, 112)


def test_level0_corners_by_hand_and_pyramid_unchanged() -> None:
    size0 = (4000, 3000)
    level0 = _grid(224, 0.5, (0.499, 0.499), size0, "level0")
    # WSInfer: k * 224 = 0, 224, 448, 672, 896
    assert [level0.tile_location(0, k)[0] for k in range(5)] == [0, 224, 448, 672, 896]
    assert [level0.tile_location(k, 0)[1] for k in range(5)] == [0, 224, 448, 672, 896]
    assert level0.tile_location(3, 2) == (448, 672)
    # the grid describes the tiles it reads: 224 px of 0.499 µm -> 0.499 µm/px, level-0 px as they are
    assert level0.config.mpp == pytest.approx(0.499, rel=1e-12) and level0.exact
    assert level0.level0_pitch == (224, 224)
    # 4000 / 224 = 17.86 -> 17 whole + a partial column 86 % inside; 3000 / 224 = 13.39 -> 13 + 1
    assert level0.shape == (14, 18)
    # pyramid mode as before: round(k * 224.4489) = 0, 224, 449 (448.898), 673 (673.347), 898 (897.796)
    pyramid = _grid(224, 0.5, (0.499, 0.499), size0, "pyramid")
    assert [pyramid.tile_location(0, k)[0] for k in range(5)] == [0, 224, 449, 673, 898]
    assert pyramid.config.mpp == 0.5 and not pyramid.exact
    # 50 px at 4 µm/px on 0.499 µm/px: WSInfer k * 401 = 1203, 1604; the drifting lattice
    # round(k * 400.8016) gives 1202 (1202.405) and 1603 (1603.206)
    coarse = _grid(50, 4.0, (0.499, 0.499), size0, "level0")
    assert [coarse.tile_location(0, k)[0] for k in range(5)] == [0, 401, 802, 1203, 1604]
    assert not coarse.exact  # 401 level-0 px are resized to the model's input
    assert [_grid(50, 4.0, (0.499, 0.499), size0, "pyramid").tile_location(0, k)[0] for k in range(5)] == [
        0, 401, 802, 1202, 1603]


def test_non_square_pixels_use_one_square_patch() -> None:
    grid = _grid(224, 0.5, (0.25, 0.26), (3000, 3000), "level0")
    # P = S = 439 (see above) along both axes
    assert grid.tile_location(2, 3) == (1317, 878) and grid.level0_pitch == (439, 439)
    # the grid counts level-0 px: 3000 / 439 = 6.83 -> 6 whole + a partial tile 83 % inside
    assert grid.shape == (7, 7)
    assert grid.target_extent == pytest.approx((3000 * 224 / 439,) * 2)


def test_explicit_stride_must_be_whole_level0_px() -> None:
    # 1 µm/px: P = 200, stride 25 of 50 -> 100 level-0 px, whole
    assert _grid(50, 4.0, (1.0, 1.0), (2000, 2000), "level0", stride=25).tile_location(0, 3) == (300, 0)
    # 0.499 µm/px: P = 401, stride 25 of 50 would be 200.5 level-0 px (WSInfer rounds it to 200)
    with pytest.raises(ConfigError, match="whole number of level-0 px"):
        _grid(50, 4.0, (0.499, 0.499), (2000, 2000), "level0", stride=25)


def test_level0_and_pyramid_configs_have_the_same_fields() -> None:
    pyramid, level0 = GridConfig(), GridConfig(source="level0")
    assert list(vars(pyramid)) == PYRAMID_CONFIG_KEYS
    assert list(vars(level0)) == PYRAMID_CONFIG_KEYS
    assert GridConfig(**vars(level0)) == level0 and vars(GridConfig(**vars(level0))) == vars(level0)
    with pytest.raises(TypeError, match="level0_placement"):
        GridConfig(source="level0", level0_placement="round(k * pitch)")


def test_store_geometry_is_the_lattice_and_old_stores_are_refused(tmp_path) -> None:
    from wsi_cmaf.infer.pipeline import analyze_slide
    from wsi_cmaf.output.store import HeatmapStore
    from wsi_cmaf.output.tiles import tile_table, tiles_geojson

    slide, folder, run, store_path = analyze_on_lattice(tmp_path, 2000, 1400)
    store = HeatmapStore.open(store_path)
    # P = 401 (see above): 2000 / 401 = 4.99 -> 5 columns; 1400 / 401 = 3.49 -> 3 whole + 1 partial
    assert store.grid_shape == (4, 5)
    assert store.attrs["grid"]["tile_origin_level0"] == [0, 0]
    assert store.attrs["grid"]["tile_stride_level0"] == pytest.approx([401, 401], abs=1e-9)
    assert store.geometry.stride_level0 == pytest.approx((401, 401), abs=1e-9)
    assert store.geometry.tile_level0 == pytest.approx((401, 401), abs=1e-9)
    assert store.um_per_tile == pytest.approx((401 * 0.499, 401 * 0.499))  # 200.099 µm
    table = tile_table(store, tissue_only=False)
    assert (table["x"] == table["col"] * 401).all() and (table["y"] == table["row"] * 401).all()
    assert (table["w"] == 401).all() and (table["h"] == 401).all()
    # tile (3, 4) is the far corner: 1203..1604 x 1604..2000 (clipped at the slide's 2000 x 1400)
    feats = {(f["properties"]["measurements"]["row"], f["properties"]["measurements"]["col"]): f
             for f in tiles_geojson(store)["features"]}
    ring = next(iter(feats.values()))["geometry"]["coordinates"][0]
    r, c = next(iter(feats))
    assert ring[0] == [c * 401, r * 401]
    cx, cy = store.geometry.tile_to_level0(np.array([3]), np.array([4]))
    assert (cx[0], cy[0]) == pytest.approx((4 * 401 + 200.5, 3 * 401 + 200.5))
    # a store of the first format, made before the WSInfer lattice: a 200 µm tile
    meta_path = store_path / "zarr.json"
    doc = json.loads(meta_path.read_text())
    meta = doc["attributes"]["wsi_cmaf"]
    meta["format_version"] = 1
    meta["layout"]["um_per_tile"] = [200.0, 200.0]
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match="older wsi-cmaf"):
        analyze_slide(slide, model=folder, out=tmp_path / "out", config=run, resume=True)


def _wsinfer_input(slide, x: int, y: int, size0: int, input_size: int) -> torch.Tensor:
    """WSInfer's documented transform on one patch: level-0 read_region -> RGB -> Resize (PIL
    bilinear) -> ToTensor -> Normalize."""
    from torchvision import transforms

    region = slide.read_region((x, y), 0, (size0, size0)).convert("RGB")
    tf = transforms.Compose([transforms.Resize(input_size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return tf(region)


def test_real_slide_matches_wsinfer_at_its_corners(tmp_path) -> None:
    if not CMU.is_file():
        print(f"skipped: {CMU} not present (real-slide check of WSInfer's patch corners)")
        pytest.skip(f"{CMU} not present")
    timm = pytest.importorskip("timm")
    tiffslide = pytest.importorskip("tiffslide")
    from wsi_cmaf.infer.config import InferenceConfig
    from wsi_cmaf.infer.pipeline import analyze_slide
    from wsi_cmaf.output.tiles import tile_table
    from wsi_cmaf.slide.reader import open_slide

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    folder = zoo_folder(tmp_path, net, 224, 0.5, 224)
    traced = torch.jit.load(str(folder / "torchscript_model.pt")).eval()
    result = analyze_slide(CMU, model=folder, out=tmp_path / "out", progress=False,
                           config=InferenceConfig(batch_size=32, overlay=False, geojson=False, precision="off"))
    table = tile_table(result.outputs["store"])
    # 0.499 µm/px: P = round(224 * 0.5 / 0.499) = round(224.4489) = 224, so patch (r, c) is at (224 c, 224 r)
    assert (table["x"] == table["col"] * 224).all() and (table["y"] == table["row"] * 224).all()
    # a few tiles past the second row/column, where round(k * 224.4489) would be 1-2 px off
    picks = table[(table["row"] >= 2) & (table["col"] >= 2) & np.isfinite(table["prob_b"])].iloc[::7][:6]
    assert len(picks) >= 3
    with tiffslide.TiffSlide(str(CMU)) as slide:
        ref = torch.stack([_wsinfer_input(slide, 224 * int(c), 224 * int(r), 224, 224)
                           for r, c in zip(picks["row"], picks["col"])])
        regions = [np.asarray(slide.read_region((224 * int(c), 224 * int(r)), 0, (224, 224)).convert("RGB"))
                   for r, c in zip(picks["row"], picks["col"])]
    with torch.inference_mode():
        p_ref = torch.softmax(traced(ref), 1)[:, 1].numpy()
    diff = np.abs(p_ref - picks["prob_b"].to_numpy())
    print(f"CMU 224 px @ 0.5 µm/px: {len(picks)} patches at WSInfer's corners, max |dp| {diff.max():.2e}")
    assert diff.max() <= PROB_TOL
    # wsi-cmaf's own tile at that grid index is WSInfer's region, pixel for pixel (same decoder)
    with open_slide(CMU, backend="tiffslide") as reader:
        grid = TileGrid.from_slide(reader, GridConfig(mpp=0.5, tile_size=224, source="level0"))
        for (r, c), region in zip(zip(picks["row"], picks["col"]), regions):
            np.testing.assert_array_equal(read_tile(reader, grid, int(r), int(c)), region)
