"""Model configuration.

Two dataclasses live here:

* :class:`ModelConfig` — the *patch-classifier* contract, written next to the weights as
  ``config.json`` (in the spirit of WSInfer's model configs): which architecture, which classes,
  at what physical resolution patches are cut, how they are resized and normalised. Everything the
  inference pipeline needs to feed a model correctly, and nothing about its internals.
* :class:`CMAFConfig` — the CMAF-Net *architecture*: every switch of the paper's ablation study
  (Table 6) and the temperature initialisations of Table 7. It travels inside
  ``ModelConfig.model_kwargs``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_cmaf.config_dict import from_dict
from wsi_cmaf.errors import ModelConfigError
from wsi_cmaf.models.bounds import check_plausible

SPEC_VERSION = "1.0"
#: "pil_bilinear": antialiased bilinear rounded to uint8, as PIL's resize (WSInfer's Resize on a PIL image).
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "pil_bilinear")
_STAIN_METHODS = (None, "macenko")
#: Where tile pixels come from: "pyramid" cuts tiles from the pyramid level nearest the target
#: µm/px (fast); "level0" reads each tile's region at full resolution and leaves the resize to
#: the model's preprocessing, as WSInfer does (slower, same pixels as WSInfer).
PATCH_SOURCES = ("pyramid", "level0")


@dataclass
class ModelConfig:
    """How to turn slide pixels into model input and model output into classes (``config.json``)."""

    architecture: str = "cmaf_net"
    num_classes: int = 2
    class_names: list[str] = field(default_factory=lambda: ["benign", "malignant"])
    positive_class: int = 1
    spacing_um_px: float = 4.0
    patch_size_pixels: int = 50
    input_size: int = 224
    resize_interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    stain_normalization: str | None = "macenko"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights_note: str = "untrained"
    spec_version: str = SPEC_VERSION
    patch_source: str = "pyramid"
    #: set when the config was translated from another format (e.g. a WSInfer config.json):
    #: the original and what each of its parts became, for provenance.
    translated_from: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        self.model_kwargs = dict(self.model_kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming every field that is wrong."""
        problems: list[str] = []
        if not isinstance(self.architecture, str) or not self.architecture:
            problems.append("architecture must be a non-empty string")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            problems.append(f"num_classes must be a positive int, got {self.num_classes!r}")
        elif len(self.class_names) != self.num_classes:
            problems.append(
                f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )
        if len(set(self.class_names)) != len(self.class_names):
            problems.append(f"class_names must be unique, got {self.class_names}")
        if isinstance(self.num_classes, int) and not 0 <= self.positive_class < max(self.num_classes, 1):
            problems.append(f"positive_class {self.positive_class} is not a class index")
        if not (isinstance(self.spacing_um_px, (int, float)) and self.spacing_um_px > 0):
            problems.append(f"spacing_um_px must be > 0, got {self.spacing_um_px!r}")
        for name in ("patch_size_pixels", "input_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8:
                problems.append(f"{name} must be an int >= 8, got {value!r}")
        if self.resize_interpolation not in _INTERPOLATIONS:
            problems.append(f"resize_interpolation must be one of {_INTERPOLATIONS}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            problems.append("mean and std must hold 3 values each and std must be > 0")
        if self.stain_normalization not in _STAIN_METHODS:
            problems.append(f"stain_normalization must be one of {_STAIN_METHODS}")
        if self.patch_source not in PATCH_SOURCES:
            problems.append(f"patch_source must be one of {PATCH_SOURCES}, got {self.patch_source!r}")
        if problems:
            raise ModelConfigError("invalid model config: " + "; ".join(problems))
        check_plausible(self.spacing_um_px, self.patch_size_pixels, self.input_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys are an error (they are usually typos).

        A WSInfer model-zoo config is refused by name: read either format with
        :func:`wsi_cmaf.models.wsinfer.model_config_from_dict`.
        """
        if not isinstance(data, dict):
            raise ModelConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        if "transform" in data:
            raise ModelConfigError("this is a WSInfer model config (it has a 'transform' list), not a wsi-cmaf one; "
                                   "read it with wsi_cmaf.models.wsinfer.model_config_from_dict / "
                                   "model_config_from_json, which translate it")
        return from_dict(cls, data, where="model config", error=ModelConfigError)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON text, and write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> ModelConfig:
        """Read a config from a JSON file path (or JSON text starting with ``{``)."""
        return cls.from_dict(read_config_json(source))


def read_config_json(source: str | Path) -> Any:
    """The parsed JSON of a model config file (or of JSON text starting with ``{``);
    :class:`ModelConfigError` when the file is missing or not JSON."""
    if isinstance(source, str) and source.lstrip().startswith("{"):
        text, where = source, "<text>"
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelConfigError(f"{path}: model config file does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{where}: not valid JSON ({exc})") from exc


# --------------------------------------------------------------------------------------------
# CMAF-Net architecture
# --------------------------------------------------------------------------------------------
_TAU_RE = re.compile(r"^\s*(fixed|uniform|normal|lognormal)\s*\(([^)]*)\)\s*$", re.IGNORECASE)
_TAU_NARGS = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}
_ATTENTION_MODES = ("nystrom", "exact", "auto")  # = models.nystrom.ATTENTION_MODES
_CONTEXT_BRANCHES = ("mobilevit", "vssm")

#: Table 7 of the paper: the temperature initialisations that were compared.
TAU_INITS_TABLE7 = (
    "fixed(1.0)",
    "fixed(0.5)",
    "uniform(0.5,1.5)",
    "normal(1.0,0.1)",
    "lognormal(0,0.1)",
    "lognormal(0,0.5)",
    "lognormal(0,1.0)",
)


def parse_tau_init(spec: str) -> tuple[str, tuple[float, ...]]:
    """Parse ``"lognormal(0,0.1)"`` style temperature-initialisation specs into (kind, params)."""
    m = _TAU_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ModelConfigError(
            f"tau_init {spec!r} is not one of fixed(t), uniform(a,b), normal(mean,std), lognormal(mu,sigma)"
        )
    kind = m.group(1).lower()
    try:
        params = tuple(float(p) for p in m.group(2).split(",") if p.strip())
    except ValueError as exc:
        raise ModelConfigError(f"tau_init {spec!r}: parameters must be numbers") from exc
    if len(params) != _TAU_NARGS[kind]:
        raise ModelConfigError(f"tau_init {spec!r}: {kind} takes {_TAU_NARGS[kind]} parameter(s)")
    if kind == "fixed" and params[0] <= 0:
        raise ModelConfigError(f"tau_init {spec!r}: temperature must be > 0")
    if kind == "uniform" and not 0 < params[0] < params[1]:
        raise ModelConfigError(f"tau_init {spec!r}: need 0 < a < b")
    if kind in ("normal", "lognormal") and params[1] < 0:
        raise ModelConfigError(f"tau_init {spec!r}: the spread must be >= 0")
    return kind, params


@dataclass(frozen=True)
class CMAFConfig:
    """Every architectural choice of CMAF-Net, including the paper's ablation switches.

    Defaults reproduce the full model of the paper (Sec. 4, Table 6 first row). Fields marked
    *loss-side* do not change the network; they are kept here so one config describes one row
    of Table 6, and the IB objective / trainer read them from ``model.config``.
    """

    input_size: int = 224  # nominal input; the network itself accepts any size >= 32
    # --- which parts exist (Table 6, "Architecture components") ---
    branches: str = "both"  # "both" | "cnn_only" (w/o contextual) | "vit_only" (w/o spatial)
    fusion: str = "cmaf"  # "cmaf" | "concat" (simple concatenation of pooled branch features)
    # --- spatial branch (Sec. 4.2) ---
    spatial_backbone: str = "resnet18"
    spatial_skip_stages: tuple[int, ...] = (1, 2, 3)  # ResNet stages merged into the last map
    spatial_attention: bool = True
    spatial_attention_kernel: int = 7
    # --- contextual branch (Sec. 4.2): MobileViT with our modifications ---
    patch_size: int = 8  # input-pixel stride of the first transformer token grid (ViT: 16)
    mvit_stem_channels: int = 16
    mvit_channels: tuple[int, ...] = (32, 48, 64, 64, 64)  # output of strides 2, 4, 8, 16, 32
    mvit_dims: tuple[int, ...] = (64, 64, 64)  # transformer width of the stages with attention
    mvit_depths: tuple[int, ...] = (2, 2, 2)
    mvit_heads: int = 4
    mvit_mlp_ratio: float = 2.0
    mvit_expansion: float = 4.0  # inverted-residual expansion
    mvit_unfold: int = 2  # MobileViT unfold patch (tokens at the same offset attend globally)
    nystrom_landmarks: int = 64  # exact attention when a sequence has <= this many tokens
    nystrom_pinv_iters: int = 6
    # "nystrom" (the paper), "exact" (fused SDPA), or "auto": exact for sequences of at most
    # attention_exact_max_tokens tokens, where it is cheaper than Nyström, Nyström beyond
    attention: str = "auto"
    attention_exact_max_tokens: int = 784  # CPU crossover measured at d_h=16, m=64 (MODEL.md)
    scale_aware_pos: bool = True  # gradient-magnitude positional embedding
    pos_scales: tuple[int, ...] = (1, 2, 4)
    context_dim: int = 480  # D_t
    # Global mixer of the contextual branch: "mobilevit" (transformers on unfolded tokens, the
    # paper) or "vssm" (VMamba-style 4-direction selective scans, models/vssm.py, in the same
    # MobileViT layout). vssm_* size the state (per channel) and the inner width (expand x dim).
    context_branch: str = "mobilevit"
    vssm_d_state: int = 4
    vssm_expand: float = 1.0
    # --- CMAF block (Sec. 4.3, Eq. 13) ---
    num_heads: int = 8  # 1 = "w/o multi-head attention"
    learn_temperature: bool = True  # False = "w/o temperature learning" (tau stays at its init)
    tau_init: str = "lognormal(0,0.1)"  # Table 7
    gating: bool = True  # False = "w/o gating": fixed g = 0.5
    reg_diversity: bool = True
    reg_entropy: bool = True
    reg_orthogonality: bool = True
    attn_dropout: float = 0.0
    # Dynamic Focal Attention: a class-attention readout inside the CMAF block with a learnable
    # per-class, per-head logit bias initialised from log class frequencies (MODEL.md). Off by
    # default, and when off no parameter is created, so weights trained without it load strictly.
    dfa: bool = False
    dfa_class_counts: tuple[float, ...] | None = None  # prior counts; None = uniform prior
    # --- information bottleneck (Sec. 3.1-3.3) ---
    bottleneck_dim: int = 64
    logvar_clamp: float = 10.0
    beta1: float = 0.01  # loss-side
    beta2: float = 0.005  # loss-side; 0.0 = "w/o IB regularisation"
    # "ramp": β rises 0 -> target over the whole of stage 2 (the paper's "gradually increasing IB
    # regularization weight" in that stage; its length sets the ramp, MODEL.md).
    beta_schedule: str = "ramp"  # loss-side; "fixed" = "Fixed beta (no scheduling)"
    # --- head ---
    head_hidden: tuple[int, ...] = (128,)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("spatial_skip_stages", "mvit_channels", "mvit_dims", "mvit_depths",
                     "pos_scales", "head_hidden"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.dfa_class_counts is not None:
            object.__setattr__(self, "dfa_class_counts", tuple(float(c) for c in self.dfa_class_counts))
        self.validate()

    @property
    def head_dim(self) -> int:
        """d_h = D_t / H (60 in the paper)."""
        return self.context_dim // self.num_heads

    @property
    def use_spatial(self) -> bool:
        """Whether the ResNet branch exists."""
        return self.branches in ("both", "cnn_only")

    @property
    def use_contextual(self) -> bool:
        """Whether the MobileViT branch exists."""
        return self.branches in ("both", "vit_only")

    @property
    def use_cmaf(self) -> bool:
        """Whether the CMAF block (cross-attention, regularisers, gate) exists."""
        return self.branches == "both" and self.fusion == "cmaf"

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming what is inconsistent."""
        problems: list[str] = []
        if self.branches not in ("both", "cnn_only", "vit_only"):
            problems.append(f"branches must be 'both', 'cnn_only' or 'vit_only', got {self.branches!r}")
        if self.fusion not in ("cmaf", "concat"):
            problems.append(f"fusion must be 'cmaf' or 'concat', got {self.fusion!r}")
        if self.input_size < 32:
            problems.append(f"input_size must be >= 32, got {self.input_size}")
        if self.num_heads < 1 or self.context_dim % self.num_heads:
            problems.append(f"context_dim {self.context_dim} must be divisible by num_heads {self.num_heads}")
        if any(s not in (1, 2, 3) for s in self.spatial_skip_stages):
            problems.append("spatial_skip_stages may only name ResNet stages 1, 2, 3")
        if self.patch_size not in (4, 8, 16, 32):
            problems.append(f"patch_size must be 4, 8, 16 or 32, got {self.patch_size}")
        if len(self.mvit_channels) != 5:
            problems.append("mvit_channels needs 5 widths (strides 2, 4, 8, 16, 32)")
        n_tr = 5 - int(round(math.log2(self.patch_size))) + 1 if self.patch_size in (4, 8, 16, 32) else 0
        if len(self.mvit_dims) != n_tr or len(self.mvit_depths) != n_tr:
            problems.append(
                f"patch_size {self.patch_size} puts transformers in {n_tr} stage(s): mvit_dims and "
                f"mvit_depths need {n_tr} entries, got {len(self.mvit_dims)} and {len(self.mvit_depths)}"
            )
        if any(d % self.mvit_heads for d in self.mvit_dims):
            problems.append(f"every mvit_dims entry must be divisible by mvit_heads={self.mvit_heads}")
        if self.nystrom_landmarks < 1 or self.mvit_unfold < 1:
            problems.append("nystrom_landmarks and mvit_unfold must be >= 1")
        if self.attention not in _ATTENTION_MODES:
            problems.append(f"attention must be one of {_ATTENTION_MODES}, got {self.attention!r}")
        if self.context_branch not in _CONTEXT_BRANCHES:
            problems.append(f"context_branch must be one of {_CONTEXT_BRANCHES}, got {self.context_branch!r}")
        if self.vssm_d_state < 1 or not self.vssm_expand > 0:
            problems.append("vssm_d_state must be >= 1 and vssm_expand > 0")
        if self.attention_exact_max_tokens < 0:
            problems.append("attention_exact_max_tokens must be >= 0")
        if self.bottleneck_dim < 1:
            problems.append("bottleneck_dim must be >= 1")
        if self.beta_schedule not in ("ramp", "fixed"):
            problems.append(f"beta_schedule must be 'ramp' or 'fixed', got {self.beta_schedule!r}")
        if self.beta1 < 0 or self.beta2 < 0:
            problems.append("beta1 and beta2 must be >= 0")
        if not 0 <= self.dropout < 1 or not 0 <= self.attn_dropout < 1:
            problems.append("dropout rates must lie in [0, 1)")
        if self.dfa and not self.use_cmaf:
            problems.append("dfa needs the CMAF block (branches='both', fusion='cmaf')")
        if self.dfa_class_counts is not None and (
            not self.dfa_class_counts or any(not c > 0 for c in self.dfa_class_counts)
        ):
            problems.append("dfa_class_counts must be positive counts, one per class")
        try:
            parse_tau_init(self.tau_init)
        except ModelConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ModelConfigError("invalid CMAF-Net config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CMAFConfig:
        """Build from a dict, rejecting unknown keys (they are usually typos)."""
        return from_dict(cls, data, where="CMAF-Net options", error=ModelConfigError)

    @classmethod
    def for_ablation(cls, name: str, **overrides: Any) -> CMAFConfig:
        """The config of one row of Table 6 (see :data:`ABLATIONS`), with extra overrides."""
        if name not in ABLATIONS:
            raise ModelConfigError(f"unknown ablation {name!r}; choose from {sorted(ABLATIONS)}")
        return cls.from_dict({**ABLATIONS[name], **overrides})


#: Table 6 rows that concern the model and the IB objective -> the fields they change.
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "cnn_only": {"branches": "cnn_only"},
    "vit_only": {"branches": "vit_only"},
    "concat": {"fusion": "concat"},
    "fixed_temperature": {"learn_temperature": False, "tau_init": "fixed(1.0)"},
    "single_head": {"num_heads": 1},
    "no_gating": {"gating": False},
    "beta2_zero": {"beta2": 0.0},
    "no_diversity": {"reg_diversity": False},
    "no_entropy": {"reg_entropy": False},
    "fixed_beta": {"beta_schedule": "fixed"},
}
