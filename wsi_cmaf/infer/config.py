"""Configuration of one inference run (everything that is not the model or the slide)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from wsi_cmaf.config_dict import PRECISIONS, from_dict


def _compile_modes() -> tuple[str, ...]:
    # imported here: the optimiser pulls in torch, which reading a config does not need
    from wsi_cmaf.models.optimize import COMPILE_MODES

    return tuple(COMPILE_MODES)


@dataclass(frozen=True)
class InferenceConfig:
    """How ``analyze_slide`` runs: device, batching, prefetch, outputs.

    The tile geometry (µm/px, tile size) comes from the model's config, not from here,
    so a model is always run at the spacing it was trained for.
    """

    device: str = "auto"
    batch_size: int = 256
    #: autocast precision, one of PRECISIONS. "auto": bf16 (fp16 without native bf16) on CUDA; on CPU
    #: bf16 only where the CPU has native bf16 (AMX / AVX512-BF16, checked at run time), else fp32;
    #: "bf16"/"fp16" force one; "off" is fp32 everywhere.
    precision: str = "auto"
    #: model preparation (wsi_cmaf.models.optimize): "auto" = torch.compile on CUDA, eager on CPU;
    #: "off" = eager everywhere; "on"/"default"/"max-autotune"/"reduce-overhead" = that compile mode.
    compile: str = "auto"
    #: blocks read ahead of the model; bounds memory (each block <= block_tiles² tiles).
    prefetch_blocks: int = 4
    #: reader threads of the in-process dask cluster used when no client is given.
    reader_threads: int = 2
    block_tiles: int = 32
    #: batches in flight on the device: size of the ring of reused pinned input buffers (CUDA).
    inflight_batches: int = 3
    #: computed blocks waiting for the writer thread; bounds results held in memory.
    write_queue: int = 4
    #: backend for block reads: "auto" (tiffslide for files OpenSlide opened when tiffslide reads
    #: the same pyramid: faster for large reads, see slide.grid.block_read_backend), "same" (the
    #: backend that opened the slide) or a backend name.
    block_backend: str = "auto"
    tissue_threshold: float = 0.5
    #: probability above which a tile counts as positive in the summary, GeoJSON and overlay outline.
    decision_threshold: float = 0.5
    #: stain normalisation. None: as the model config says; "macenko" forces it; "none" turns it off.
    stain: str | None = None
    overlay: bool = True
    geojson: bool = True
    #: per-slide tile progress bar: True = when stderr is a terminal, False = never,
    #: "always" = also when stderr is not a terminal (a log file, a CI job).
    progress: bool | str = True
    #: also store each tissue tile's embedding (``forward_head(..., pre_logits=True)``) in the store's
    #: ``embeddings`` array, computed in the same pass; needs a model with forward_features/forward_head.
    embeddings: bool = False
    #: slide QC (wsi_cmaf.qc): out-of-focus tiles measured, ink and the µm/px check reported in the
    #: store's ``qc`` group and the summary
    qc: bool = True
    #: estimate the µm/px from the nuclei and warn when the metadata disagree (part of the QC)
    mpp_check: bool = True
    #: leave tiles the QC flags as out of focus out of the analysis (they stay flagged in ``qc/blur``)
    exclude_blurred: bool = False
    #: who decodes block pixels: "cpu" (the slide backend on the reader threads) or "device"
    #: (JPEG tiles of TIFF/SVS levels decoded by torchvision on the model's device, nvJPEG on CUDA;
    #: other slides fall back to "cpu"; see wsi_cmaf.infer.device_decode)
    decode: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from wsi_cmaf.errors import ConfigError

        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prefetch_blocks < 1:
            raise ConfigError(f"prefetch_blocks must be >= 1, got {self.prefetch_blocks}")
        if self.inflight_batches < 1 or self.write_queue < 1:
            raise ConfigError(f"inflight_batches and write_queue must be >= 1, got "
                              f"{self.inflight_batches} and {self.write_queue}")
        compile_modes = _compile_modes()
        if self.compile not in compile_modes:
            raise ConfigError(f"compile must be one of {compile_modes}, got {self.compile!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stain not in {None, "macenko", "none"}:
            raise ConfigError(f"stain must be None (as the model config says), 'macenko' or 'none' (off), "
                              f"got {self.stain!r}")
        if self.progress not in (True, False, "always"):
            raise ConfigError(f"progress must be True, False or 'always', got {self.progress!r}")
        from wsi_cmaf.slide.reader import BACKENDS

        if self.block_backend not in {"auto", "same", *BACKENDS}:
            raise ConfigError(f"block_backend must be auto, same or one of {BACKENDS}, got {self.block_backend!r}")
        if self.decode not in {"cpu", "device"}:
            raise ConfigError(f"decode must be 'cpu' or 'device', got {self.decode!r}")
        if not 0.0 <= self.decision_threshold <= 1.0:
            raise ConfigError(f"decision_threshold must be in [0, 1], got {self.decision_threshold}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> InferenceConfig:
        """Build from a mapping, e.g. the ``inference`` attributes a store records; unknown keys
        raise :class:`~wsi_cmaf.errors.ConfigError` naming them and the valid ones."""
        return from_dict(cls, data, where="inference config")
