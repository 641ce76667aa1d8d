"""Training configuration: one YAML/JSON file describes one training run.

Sections (all optional except ``data``)::

    data:     where patches come from (manifest CSV, patch store, or generated synthetic patches),
              imbalance resampling, batch size, augmentation, stain normalisation
    model:    registry name (``cmaf_net`` or ``timm:<name>``), CMAF-Net overrides / ablation,
              input geometry written into the saved ``config.json``; ``tasks`` for multi-task heads
    loss:     :class:`wsi_cmaf.losses.LossConfig` (task loss + IB weights), plus ``task_weights``
    optim:    AdamW weight decay, SAM, adaptive gradient clipping
    stages:   the paper's three stages (Sec. 4.5): epochs 30/40/30 by default
    seed, precision, compile, grad_checkpointing, early_stopping_patience, output_dir, device ...

``precision``: "auto" = bf16 autocast on CUDA GPUs with native bf16 (no loss scaling),
fp16 + GradScaler on older CUDA GPUs, fp32 elsewhere; "bf16", "fp16" (with a GradScaler, on
CUDA or CPU) and "off" (fp32) force one. Updates whose gradients are not finite are skipped on
the device; while a GradScaler calibrates (its scale halving from 2^16) such skips are expected.
Training stops with "training diverged" only when skips persist once loss scaling cannot explain
them (no scaler, or its scale below 1): 24 consecutive skipped updates or a whole epoch of them.

``compile``: "auto" compiles the training forward passes with ``torch.compile`` on CUDA and stays
eager elsewhere; "off" never compiles; "on" compiles on any device (default mode); "default",
"max-autotune" or "max-autotune-no-cudagraphs" compile with that mode. Compilation is in place
(``module.compile()``), so checkpoints and exported weights have the same keys as eager runs.
CUDA graphs ("reduce-overhead") are not offered for training: SAM perturbs the weights in place
between two passes and the last batch of an epoch changes shape.

Multi-task heads: ``model.tasks: {malignancy: 2, subtype: 8}`` on the
``multitask`` wrapper (``model.kwargs.backbone``: ``cmaf_net`` by default, or a timm model) trains
one head per task on a shared embedding. The first task is the primary one: its labels are the
manifest's ``label`` column, its loss is the configured objective (A-CBFL + IB terms ...), and
checkpoint selection, early stopping and the test report use it. Every other task reads the manifest
column of its name (``subtype``: BreakHis names or class indices; empty = no label) and adds
``loss.task_weights[task]`` (default 1) x a cross-entropy over the samples that carry its label.

The ``model`` section's class, :class:`~wsi_cmaf.train.model_section.ModelSection`, lives in
:mod:`wsi_cmaf.train.model_section` and is re-exported here; every other section is defined here.

Unknown keys are errors (they are almost always typos). Relative paths in the file are
resolved against the file's folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_cmaf.config_dict import PRECISIONS, check_keys, field_names, from_dict
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.losses import LossConfig
from wsi_cmaf.train.model_section import ModelSection

STAGE_KINDS = ("branches", "fusion", "all")
STAGE_LOSSES = ("cross_entropy", "objective")
IB_MODES = ("off", "ramp", "full")
COMPILE_MODES = ("auto", "off", "on", "default", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    """Where training patches come from and how batches are made.

    Exactly one of ``source`` (manifest CSV or patch-store directory) and ``synthetic``
    (keyword arguments of :class:`~wsi_cmaf.train.data.synthetic_patches.SyntheticPatchConfig`;
    generated once into ``synthetic_dir`` and reused) must be given.
    """

    source: str | None = None
    synthetic: dict[str, Any] | None = None
    synthetic_dir: str | None = None  # default: <output_dir>/synthetic_data
    imbalance_ratio: str | None = None  # e.g. "95:5": undersample the TRAIN split only
    target: str = "label"  # "label" (benign/malignant) or "subtype" (BreakHis 8-class)
    # Sec. 5.3: "batch size of 128 (64 per GPU with gradient accumulation)": each optimiser step sees
    # batch_size samples, processed in passes of micro_batch_size (gradients accumulated; BatchNorm and
    # the HSIC estimate see one micro-batch, as each GPU did). None = one pass per step.
    batch_size: int = 128
    micro_batch_size: int | None = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    in_memory: bool = True
    check_images: str = "exists"
    augment: bool = True
    augment_kwargs: dict[str, Any] = field(default_factory=dict)
    stain_patches_per_patient: int = 64  # patches sampled to fit each patient's Macenko matrix
    max_steps_per_epoch: int | None = None  # cap (quick runs); None = full pass over train
    # How manifest images reach the model (train/data/geometry.py): "tile" = images at the model's
    # tile size (IDC), "resize" = images larger than a tile are resized whole to model.input_size
    # (BreakHis, as the paper did), "auto" = decided from the images' sizes. Never a crop.
    image_geometry: str = "auto"

    @property
    def accumulation_steps(self) -> int:
        """Forward/backward passes per optimiser step for a full batch (1 = no accumulation)."""
        if self.micro_batch_size is None or self.micro_batch_size >= self.batch_size:
            return 1
        return -(-self.batch_size // self.micro_batch_size)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on inconsistent values."""
        if (self.source is None) == (self.synthetic is None):
            raise ConfigError("data: give exactly one of 'source' (manifest/patch store) or 'synthetic'")
        if self.target not in ("label", "subtype"):
            raise ConfigError(f"data.target must be 'label' or 'subtype', got {self.target!r}")
        if self.batch_size < 2 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size must be >= 2 and eval_batch_size >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 2:
            raise ConfigError("data.micro_batch_size must be >= 2 (BatchNorm, HSIC) or null")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError("data.max_steps_per_epoch must be >= 1 or null")
        from wsi_cmaf.train.data.geometry import GEOMETRIES

        if self.image_geometry not in GEOMETRIES:
            raise ConfigError(f"data.image_geometry must be one of {GEOMETRIES}, got {self.image_geometry!r}")


CLIP_MODES = ("agc", "history", "none")


@dataclass
class OptimConfig:
    """AdamW (+ SAM) and adaptive gradient clipping (Sec. 4.5)."""

    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    sam: bool = True
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    agc_clip_factor: float | None = 0.01  # timm's adaptive_clip_grad; null = no clipping
    # Gradient clipping: "agc" (unit-wise, agc_clip_factor), "history" (the global gradient norm
    # clipped to clip_history_multiplier x the median of the last clip_history_window norms: the
    # paper's "based on gradient norm history", which gives no formula) or "none".
    clip: str = "agc"
    clip_history_window: int = 50
    clip_history_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.clip not in CLIP_MODES:
            raise ConfigError(f"optim.clip must be one of {CLIP_MODES}, got {self.clip!r}")
        if self.clip_history_window < 1 or not self.clip_history_multiplier > 0:
            raise ConfigError("optim.clip_history_window must be >= 1 and clip_history_multiplier > 0")


@dataclass
class StageConfig:
    """One training stage.

    ``trainable``: "branches" (stage 1: the two feature extractors, each with its own temporary
    linear head), "fusion" (stage 2: everything except the extractors, which are frozen) or
    "all" (stage 3). ``loss``: "cross_entropy" (plain CE) or "objective" (configured task loss
    + IB terms). ``ib``: IB weights off / ramped 0 -> target over this stage / at target.
    ``dynamic_weighting``: A-CBFL progress t runs 0 -> 1 over this stage (else t stays 0).
    ``schedule``: a name of :data:`wsi_cmaf.train.engine.schedules.SCHEDULES`; ``warmup_epochs`` is used by
    "warmup"/"warmup_cosine"; "cyclic" cycles between lr/10 and lr with ``cycle_epochs`` per half cycle.
    """

    name: str
    epochs: int
    lr: float
    trainable: str = "all"
    loss: str = "objective"
    ib: str = "full"
    dynamic_weighting: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    cycle_epochs: float = 2.0
    select_best: bool = True  # may this stage's epochs become the best checkpoint?

    def validate(self) -> None:
        """Raise :class:`ConfigError` on impossible values."""
        if self.trainable not in STAGE_KINDS:
            raise ConfigError(f"stage {self.name}: trainable must be one of {STAGE_KINDS}")
        if self.loss not in STAGE_LOSSES:
            raise ConfigError(f"stage {self.name}: loss must be one of {STAGE_LOSSES}")
        if self.ib not in IB_MODES:
            raise ConfigError(f"stage {self.name}: ib must be one of {IB_MODES}")
        if self.epochs < 0 or not self.lr > 0:
            raise ConfigError(f"stage {self.name}: epochs must be >= 0 and lr > 0")


def paper_stages(epochs: tuple[int, int, int] = (30, 40, 30)) -> list[StageConfig]:
    """The three stages of Sec. 4.5 with the paper's learning rates and schedules."""
    return [
        StageConfig("branches", epochs[0], 1e-3, trainable="branches", loss="cross_entropy", ib="off",
                    schedule="cosine", select_best=False),
        StageConfig("fusion", epochs[1], 1e-4, trainable="fusion", loss="objective", ib="ramp",
                    schedule="warmup", warmup_epochs=max(epochs[1] * 0.1, 0.5)),
        StageConfig("finetune", epochs[2], 1e-5, trainable="all", loss="objective", ib="full",
                    dynamic_weighting=True, schedule="cyclic", cycle_epochs=max(epochs[2] / 6, 0.5)),
    ]


def single_stage(epochs: int = 100, lr: float = 1e-4) -> list[StageConfig]:
    """Baselines (timm models): one stage, everything trainable, chosen loss, cosine schedule."""
    return [StageConfig("single", epochs, lr, trainable="all", loss="objective", ib="full",
                        dynamic_weighting=True, schedule="warmup_cosine", warmup_epochs=max(epochs * 0.05, 0.5))]


@dataclass
class TrainLossConfig(LossConfig):
    """:class:`~wsi_cmaf.losses.LossConfig` plus the weights of the secondary tasks' losses."""

    task_weights: dict[str, float] = field(default_factory=dict)  # {task: weight}; default 1 each

    def validate(self) -> TrainLossConfig:
        """LossConfig's checks, and finite weights >= 0."""
        super().validate()
        if not isinstance(self.task_weights, dict):
            raise ConfigError(f"loss.task_weights must be a mapping task -> weight, got {self.task_weights!r}")
        for name, w in self.task_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"loss.task_weights[{name!r}] must be a finite number >= 0, got {w!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """LossConfig's dict, ``task_weights`` included (empty for a single-task model)."""
        out = super().to_dict()
        out.pop("ramp_steps", None)  # set per stage by the trainer; refused in training configs
        return out


@dataclass
class TrainConfig:
    """A whole training run. Build with :meth:`from_file` / :meth:`from_dict`."""

    data: DataConfig
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=TrainLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: list[StageConfig] | None = None  # None: paper_stages() for CMAF-Net, single_stage() for timm
    seed: int = 0
    precision: str = "auto"  # auto: bf16 on CUDA (fp16 + GradScaler without native bf16), fp32 on CPU
    compile: str = "auto"  # auto: torch.compile on CUDA, eager elsewhere (see the module docstring)
    grad_checkpointing: bool = False
    early_stopping_patience: int | None = 10  # epochs without val balanced-accuracy gain (per stage)
    output_dir: str = "runs/train"
    device: str = "auto"
    log_every: int = 10  # optimiser steps between detailed log rows (tau, entropy, grad norms)
    bootstrap: int = 1000  # bootstrap resamples for the test-set confidence intervals
    progress_bar: bool = True
    name: str = "run"
    weights_note: str | None = None  # provenance recorded in config.json; default describes the run
    # A named whole-run setting (wsi_cmaf.train.presets): "paper" = the paper's recipe; the file's
    # own keys override it. Recorded so a saved config says where its values came from.
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.stages is None:
            self.stages = paper_stages() if self.model.is_cmaf else single_stage()

    def validate(self) -> TrainConfig:
        """Check every section; returns ``self``."""
        self.data.validate()
        self.loss.validate()
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if not self.stages:
            raise ConfigError("at least one training stage is needed")
        for stage in self.stages:
            stage.validate()
            if not self.model.is_cmaf and stage.trainable != "all":
                raise ConfigError(f"stage {stage.name}: timm baselines train single-stage (trainable: all)"
                                  + (f"; the backbone {self.model.backbone_name!r} has no CMAF-Net branches"
                                     if self.model.is_task_model else ""))
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        if self.model.num_classes < 2:
            raise ConfigError("model.class_names needs at least two classes")
        self.model.validate_tasks(self.task_weights)
        if self.model.tasks and self.data.target != "label":
            raise ConfigError("model.tasks: the primary task uses the manifest's label column; keep data.target: "
                              "label and make subtype a secondary task")
        if self.model.is_task_model and self.model.ablation and not self.model.is_cmaf:
            raise ConfigError("model.ablation applies to a cmaf_net backbone only")
        return self

    @property
    def task_weights(self) -> dict[str, float]:
        """Weights of the secondary tasks' losses (``loss.task_weights``; empty when unset)."""
        return dict(getattr(self.loss, "task_weights", None) or {})

    # ------------------------------------------------------------------ IO
    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path | None = None) -> TrainConfig:
        """Build from a plain dict (parsed YAML/JSON); relative paths resolve against ``base_dir``."""
        if not isinstance(data, dict) or "data" not in data:
            raise ConfigError("training config must be a mapping with at least a 'data' section")
        data = dict(data)
        if data.get("preset") is not None:  # the preset first, the file's own keys on top
            from wsi_cmaf.train.presets import preset_dict

            data = merge_dicts(preset_dict(str(data["preset"])), data)
        if "amp" in data:  # the same setting is called precision in inference and on the command line
            raise ConfigError(f"training config: 'amp' is not an option; write precision: {data['amp']} "
                              f"(one of {PRECISIONS})")
        check_keys(data, field_names(cls), where="training config")
        if "ramp_steps" in (data.get("loss") or {}):
            raise ConfigError("loss.ramp_steps does nothing in a training run: the β ramp spans each stage with "
                              "ib: ramp (stages[].ib, stages[].epochs); remove the key")
        sections: dict[str, Any] = {
            "data": from_dict(DataConfig, data.pop("data"), where="training config: data"),
            "model": from_dict(ModelSection, data.pop("model", None), where="training config: model"),
            "loss": TrainLossConfig.from_dict(data.pop("loss", None) or {}),
            "optim": from_dict(OptimConfig, data.pop("optim", None), where="training config: optim"),
        }
        stages = data.pop("stages", None)
        if isinstance(stages, dict) and set(stages) == {"epochs"}:  # shorthand: stages: {epochs: [3, 4, 3]}
            stages = [dataclasses.asdict(s) for s in paper_stages(tuple(stages["epochs"]))]
        if stages is not None:
            stages = [from_dict(StageConfig, s, where=f"training config: stages[{i}]") for i, s in enumerate(stages)]
        cfg = cls(**sections, stages=stages, **data)
        if base_dir is not None:
            cfg.resolve_paths(Path(base_dir))
        return cfg.validate()

    def resolve_paths(self, base: Path) -> None:
        """Make relative paths absolute against ``base`` (the config file's folder)."""
        def fix(p: str | None) -> str | None:
            return p if p is None or Path(p).is_absolute() else str((base / p).resolve())

        self.data.source = fix(self.data.source) if self.data.source else None
        self.data.synthetic_dir = fix(self.data.synthetic_dir) if self.data.synthetic_dir else None
        self.output_dir = fix(self.output_dir) or self.output_dir

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a ``.yaml``/``.yml``/``.json`` file; ``overrides`` are merged in (nested dicts merge)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: training config file does not exist")
        import yaml  # PyYAML: a dependency of dask, so always present

        text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot parse ({exc})") from exc
        return cls.from_dict(merge_dicts(data or {}, overrides or {}), base_dir=path.parent)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through :meth:`from_dict`)."""
        out = dataclasses.asdict(self)
        out["loss"] = self.loss.to_dict()
        out["loss"].pop("ramp_steps", None)  # the trainer sets it per stage; from_dict refuses it
        return json.loads(json.dumps(out))

    def to_json(self, path: str | Path) -> Path:
        """Write the resolved config (as it was run) to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: dict values merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out
