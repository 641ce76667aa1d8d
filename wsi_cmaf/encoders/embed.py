"""``embed_slide`` / ``embed_slides``: an encoder's tile embeddings through the analysis engine.

The encoder runs as the model of :func:`~wsi_cmaf.infer.analyze_slide` with embeddings on, so
it gets everything that engine does (tissue mask, streaming blocks, tile fault isolation,
bit-identical resume, the dask batch engine on local GPUs or SLURM/PBS). Its store is a heatmap
store of its own (own identity: encoder, weights SHA-256, grid at the encoder's µm/px and input
size) nested in the slide's store folder::

    <out>/<slide>.zarr/                    the CMAF-Net heatmap store (when analysed)
    <out>/<slide>.zarr/encoders/<name>/    one store per encoder: ``embeddings`` (rows, cols, D)
                                           float16 + tile table; main image = coverage map
    <out>/<slide>_<name>_embed_summary.json

so one slide folder holds a heatmap and any number of encoders' embeddings side by side, each
resumable on its own. :func:`encoder_store_path` names the nested store; any reader of
embeddings (``read_embeddings``, ``train-slide``, the exports) takes that path.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from wsi_cmaf.encoders.build import COVERAGE_CLASS
from wsi_cmaf.encoders.loader import LoadedEncoder, load_encoder
from wsi_cmaf.errors import OutputError

logger = logging.getLogger(__name__)

ENCODERS_GROUP = "encoders"
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "pil_bilinear")


def safe_name(encoder: str) -> str:
    """The store-group name of an encoder (``timm:vit_base_patch16_224`` -> ``timm_vit_base_patch16_224``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(encoder))


def encoder_store_path(out_dir: str | Path, slide: str | Path, encoder: str) -> Path:
    """Where :func:`embed_slide` writes ``encoder``'s store for ``slide`` under ``out_dir``."""
    return Path(out_dir) / f"{Path(slide).stem}.zarr" / ENCODERS_GROUP / safe_name(encoder)


def find_encoder_store(store_or_dir: str | Path, encoder: str | None) -> Path:
    """The embedding store to read: ``store_or_dir`` itself when ``encoder`` is None, else its
    ``encoders/<name>`` store (``store_or_dir`` may be a slide's store folder)."""
    path = Path(store_or_dir)
    if encoder is None:
        return path
    sub = path / ENCODERS_GROUP / safe_name(encoder)
    if not sub.is_dir():
        have = sorted(p.name for p in (path / ENCODERS_GROUP).iterdir()) if (path / ENCODERS_GROUP).is_dir() else []
        raise OutputError(f"{path} holds no embeddings of encoder {encoder!r} (it has {have or 'none'}); "
                          f"run `wsi-cmaf embed SLIDE --encoder {encoder}` into the same --out")
    return sub


def encoder_model(loaded: LoadedEncoder):
    """The encoder as a :class:`~wsi_cmaf.infer.modelspec.ResolvedModel` the engine runs."""
    from wsi_cmaf.infer.modelspec import ResolvedModel
    from wsi_cmaf.models import ModelConfig

    spec = loaded.spec
    cfg = ModelConfig(architecture=f"encoder:{spec.name}", num_classes=1, class_names=[COVERAGE_CLASS],
                      positive_class=0, spacing_um_px=spec.mpp, patch_size_pixels=spec.input_size,
                      input_size=spec.input_size,
                      resize_interpolation=spec.resize if spec.resize in _INTERPOLATIONS else "bilinear",
                      mean=spec.mean, std=spec.std, stain_normalization=None,
                      model_kwargs={"encoder": {**spec.to_dict(), "dim": loaded.dim}}, weights_note=loaded.note)
    return ResolvedModel(loaded.module, cfg, f"encoder:{spec.name}", loaded.weights_sha256,
                         untrained=loaded.untrained)


def embed_config(config: Any, encoder: str):
    """``config`` (an InferenceConfig or None) set up for an encoder run: embeddings on, no
    overlay/GeoJSON (a coverage map has nothing to outline), nested store and summary names
    (``{stem}`` is filled in with each slide's name by the engine)."""
    from wsi_cmaf.infer.config import InferenceConfig

    cfg = config or InferenceConfig()
    name = safe_name(encoder)
    extra = {**cfg.extra, "store_name": f"{{stem}}.zarr/{ENCODERS_GROUP}/{name}",
             "summary_name": f"{{stem}}_{name}_embed_summary.json"}
    return dataclasses.replace(cfg, embeddings=True, overlay=False, geojson=False, extra=extra)


def _mark_group(out_dir: Path, stem: str) -> None:
    """Make ``<stem>.zarr/encoders`` a Zarr group, so the slide's store lists its encoders."""
    import zarr

    group = out_dir / f"{stem}.zarr" / ENCODERS_GROUP
    if not (group / "zarr.json").is_file():
        group.mkdir(parents=True, exist_ok=True)
        zarr.create_group(str(group), zarr_format=3, attributes={"wsi_cmaf": {"kind": "encoder embedding stores"}})


def resolve_encoder(encoder: str | LoadedEncoder, weights: str | Path | None = None, *, allow_download: bool = False,
                    random_weights: bool = False, input_size: int | None = None, mpp: float | None = None
                    ) -> LoadedEncoder:
    """``encoder`` loaded (a :class:`LoadedEncoder` is returned as it is)."""
    if isinstance(encoder, LoadedEncoder):
        return encoder
    return load_encoder(encoder, weights, allow_download=allow_download, random_weights=random_weights,
                        input_size=input_size, mpp=mpp)


def embed_slide(slide: str | Path, encoder: str | LoadedEncoder, out: str | Path, *, weights: str | Path | None = None,
                allow_download: bool = False, random_weights: bool = False, config: Any = None,
                **analyze_kwargs: Any):
    """Embed every tissue tile of ``slide`` with ``encoder`` into its store under ``out``.

    Returns the engine's :class:`~wsi_cmaf.infer.result.SlideResult` (its ``store`` is the
    encoder's store). A rerun resumes; other keyword arguments go to ``analyze_slide``
    (``mpp``, ``device``, ``batch_size``, ``client`` ...).
    """
    from wsi_cmaf.infer import analyze_slide

    loaded = resolve_encoder(encoder, weights, allow_download=allow_download, random_weights=random_weights)
    slide = Path(slide)
    out = Path(out)
    cfg = embed_config(config, loaded.spec.name)
    _mark_group(out, slide.stem)
    return analyze_slide(slide, model=encoder_model(loaded), out=out, config=cfg, **analyze_kwargs)


def embed_slides(slides: Any, out_dir: str | Path, encoder: str | LoadedEncoder, *, weights: str | Path | None = None,
                 allow_download: bool = False, random_weights: bool = False, config: Any = None,
                 **batch_kwargs: Any):
    """Embed many slides (paths, a glob, a folder or a CSV, as ``wsi-cmaf batch``) on the dask
    batch engine: local workers, a scheduler, or SLURM/PBS (``batch_kwargs`` go to
    :func:`~wsi_cmaf.cluster.analyze_slides`). Finished slides are skipped and partial ones
    resume; the encoder's own status table is ``out_dir/status_<name>.csv``."""
    from wsi_cmaf.cluster import analyze_slides
    from wsi_cmaf.infer.config import InferenceConfig

    loaded = resolve_encoder(encoder, weights, allow_download=allow_download, random_weights=random_weights)
    cfg = embed_config(config or InferenceConfig(progress=False, reader_threads=1), loaded.spec.name)
    return analyze_slides(slides, out_dir, model=encoder_model(loaded), config=cfg,
                          status_name=status_name(loaded.spec.name), **batch_kwargs)


def status_name(encoder: str) -> str:
    """File name of an encoder's batch status table (beside the heatmap batch's ``status.csv``)."""
    return f"status_{safe_name(encoder)}.csv"
