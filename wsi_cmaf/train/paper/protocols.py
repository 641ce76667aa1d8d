"""One command per paper protocol: named runs over a base training config, then tables and figures.

A protocol is a list of :class:`RunSpec` (a name, overrides of the base config, and the labels that
become table columns). :func:`run_protocol` trains them one after the other through
:func:`wsi_cmaf.train.engine.trainer.train`, each in ``<out>/<run name>/``, and writes ``result.json``
there when a run is done. Re-running the same command therefore skips finished runs and resumes a
run that was interrupted (``resume=True`` picks up its checkpoints), so a long sweep can
be stopped and restarted at will. The tables and figures are written by
:mod:`wsi_cmaf.train.paper.report`; Table 8 (efficiency, no training) lives in
:mod:`wsi_cmaf.train.paper.efficiency`.

Protocols (paper numbering): ``table1`` main comparison, ``imbalance`` (Table 2 / Fig. 3),
``ablations`` (Table 6), ``temperature`` (Table 7), ``fig4`` (one CMAF-Net run: τ and attention
entropy per head), ``efficiency`` (Table 8).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.train.config import TrainConfig, merge_dicts, single_stage

logger = logging.getLogger(__name__)

PROTOCOLS = ("table1", "imbalance", "ablations", "temperature", "efficiency", "fig4")
#: Table 1 architecture baselines (timm, random init: this project never downloads weights).
TIMM_BASELINES = ("resnet50", "densenet121", "efficientnet_b3", "convnext_tiny",
                  "vit_small_patch16_224", "swin_tiny_patch4_window7_224", "deit_small_patch16_224")
#: Table 1 loss baselines, trained on CMAF-Net (cross-entropy included as the plain reference).
LOSS_BASELINES = ("cross_entropy", "focal", "class_balanced", "ldam", "balanced_softmax")
#: Table 6 rows that change the loss rather than the network (names of wsi_cmaf.losses.LOSSES).
LOSS_ABLATIONS = ("acbfl_no_class_gamma", "acbfl_no_dynamic")
DEFAULT_RATIOS = ("70:30", "95:5", "99:1")
DEFAULT_LOSSES = ("cross_entropy", "focal", "acbfl")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)  # the paper reports "five runs with different random seeds"
RESULT_FILE = "result.json"  # written by the trainer when a run is finished
# timm families whose positional embedding / windows are tied to the input size.
_FIXED_SIZE_PREFIXES = ("vit_", "deit_", "swin_")


@dataclass
class RunSpec:
    """One training run of a protocol.

    ``overrides`` merge into the base config (:func:`~wsi_cmaf.train.config.merge_dicts`);
    ``replace`` maps dotted keys to values that replace the base value outright (needed where a
    merge would keep stale entries, e.g. CMAF-Net kwargs under a timm model). ``labels`` become
    the table columns; ``seed`` is always one of them.
    """

    name: str
    labels: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    replace: dict[str, Any] = field(default_factory=dict)


@dataclass
class Protocol:
    """A named list of runs; ``group_by`` are the label columns that define a setting (seed excluded)."""

    name: str
    runs: list[RunSpec]
    group_by: list[str]
    title: str = ""


# ----------------------------------------------------------------------------- overrides
def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"`` in place (creating dicts on the way)."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"bad config key {key!r}: use dotted names such as 'data.batch_size'")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} holds {type(child).__name__}, not a section")
        node = child
    node[parts[-1]] = value
    return data


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["data.batch_size=32", "stages.epochs=[1,1,1]"]`` -> nested override dict.

    Values are read as YAML, so numbers, booleans, ``null`` and lists work; anything else stays a
    string.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. data.batch_size=32), got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
        set_dotted(out, key, value)
    return out


def load_base(path: str | Path | None, sets: Sequence[str] = ()) -> tuple[dict[str, Any], Path]:
    """Read the base training config (YAML/JSON) and apply ``--set`` items -> (dict, its folder)."""
    import yaml

    data: dict[str, Any] = {}
    folder = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: base training config does not exist")
        try:
            text = p.read_text(encoding="utf-8")
            data = (yaml.safe_load(text) if p.suffix.lower() in (".yaml", ".yml") else json.loads(text)) or {}
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p}: cannot parse ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a training config must be a mapping")
        folder = p.resolve().parent
    return merge_dicts(data, parse_set(sets)), folder


def run_config(base: dict[str, Any], spec: RunSpec, run_dir: Path, base_dir: Path | None = None) -> TrainConfig:
    """The validated :class:`TrainConfig` of one run (output in ``run_dir``)."""
    data = merge_dicts(copy.deepcopy(base), spec.overrides)
    for key, value in spec.replace.items():
        set_dotted(data, key, copy.deepcopy(value))
    data["output_dir"] = str(run_dir)
    data["name"] = spec.name
    return TrainConfig.from_dict(data, base_dir=base_dir)


# ----------------------------------------------------------------------------- protocol builders
def safe_name(text: str) -> str:
    """A folder-name-safe form of a label value ("95:5" -> "95-5", "lognormal(0,0.1)" -> "lognormal_0_0.1")."""
    text = str(text).replace(":", "-")
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text).strip("_") or "x"


def _seeded(setting: str, labels: dict[str, Any], seeds: Sequence[int], overrides: dict[str, Any] | None = None,
            replace: dict[str, Any] | None = None) -> list[RunSpec]:
    return [RunSpec(f"{setting}__seed-{s}", {**labels, "seed": int(s)},
                    merge_dicts(overrides or {}, {"seed": int(s)}), dict(replace or {})) for s in seeds]


def _total_epochs(base: dict[str, Any]) -> int | None:
    """Sum of the base config's stage epochs (None when it relies on the defaults)."""
    stages = base.get("stages")
    if isinstance(stages, dict) and "epochs" in stages:
        return int(sum(stages["epochs"]))
    if isinstance(stages, list):
        return int(sum(int(s.get("epochs", 0)) for s in stages))
    return None


def timm_baseline_replace(base: dict[str, Any], arch: str) -> dict[str, Any]:
    """Dotted replacements that turn a CMAF-Net base config into one for ``timm:<arch>``.

    Baselines train single-stage for as many epochs as the base's three stages together, with
    CMAF-Net-only settings removed; ViT/DeiT/Swin get ``img_size`` when the input is not 224.
    """
    size = int((base.get("model") or {}).get("input_size", 224))
    kwargs: dict[str, Any] = {}
    if arch.startswith(_FIXED_SIZE_PREFIXES) and size != 224:
        kwargs["img_size"] = size
    total = _total_epochs(base)
    stages = [dataclasses.asdict(s) for s in (single_stage(total) if total is not None else single_stage())]
    return {"model.name": f"timm:{arch}", "model.kwargs": kwargs, "model.ablation": None, "stages": stages}


def build_protocol(name: str, base: dict[str, Any], *, seeds: Sequence[int] = DEFAULT_SEEDS,
                   ratios: Sequence[str] = DEFAULT_RATIOS, losses: Sequence[str] = DEFAULT_LOSSES,
                   baselines: Sequence[str] = TIMM_BASELINES,
                   loss_baselines: Sequence[str] = LOSS_BASELINES) -> Protocol:
    """The runs of protocol ``name`` (one of :data:`PROTOCOLS` except ``efficiency``)."""
    from wsi_cmaf.losses.registry import canonical_loss_name
    from wsi_cmaf.models import ABLATIONS, TAU_INITS_TABLE7
    from wsi_cmaf.train.data.imbalance import parse_ratio

    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    if name == "efficiency":
        raise ConfigError("the efficiency protocol trains nothing: use protocol_efficiency.run_efficiency")
    if not seeds:
        raise ConfigError("at least one seed is needed")
    base_loss = canonical_loss_name(str((base.get("loss") or {}).get("loss", "acbfl")))
    runs: list[RunSpec] = []
    if name == "table1":
        runs += _seeded("cmaf_net", {"model": "cmaf_net", "loss": base_loss}, seeds,
                        replace={"model.name": "cmaf_net"})
        for arch in baselines:
            runs += _seeded(f"timm-{safe_name(arch)}", {"model": f"timm:{arch}", "loss": base_loss}, seeds,
                            replace=timm_baseline_replace(base, arch))
        for loss in loss_baselines:
            loss = canonical_loss_name(loss)
            if loss != base_loss:
                runs += _seeded(f"cmaf_net-{loss}", {"model": "cmaf_net", "loss": loss}, seeds,
                                {"loss": {"loss": loss}}, {"model.name": "cmaf_net"})
        return Protocol(name, runs, ["model", "loss"], "Table 1: main comparison")
    if name == "imbalance":
        if not ratios or not losses:
            raise ConfigError("the imbalance protocol needs at least one ratio and one loss")
        for ratio in ratios:
            parse_ratio(ratio)
            for loss in losses:
                loss = canonical_loss_name(loss)
                runs += _seeded(f"ratio-{safe_name(ratio)}__{loss}", {"ratio": ratio, "loss": loss}, seeds,
                                {"data": {"imbalance_ratio": ratio}, "loss": {"loss": loss}})
        return Protocol(name, runs, ["ratio", "loss"], "Table 2: sensitivity under class imbalance")
    if name == "ablations":
        for abl in ABLATIONS:
            runs += _seeded(f"model-{abl}", {"ablation": abl}, seeds,
                            replace={"model.ablation": None if abl == "full" else abl})
        for loss in LOSS_ABLATIONS:
            runs += _seeded(f"loss-{loss}", {"ablation": loss}, seeds, {"loss": {"loss": loss}},
                            {"model.ablation": None})
        # An addition, not an ablation: the full model plus the DFA class-attention readout.
        runs += _seeded("model-with_dfa", {"ablation": "with_dfa"}, seeds, {"model": {"kwargs": {"dfa": True}}},
                        {"model.ablation": None})
        return Protocol(name, runs, ["ablation"], "Table 6: ablations")
    if name == "temperature":
        for spec in TAU_INITS_TABLE7:
            runs += _seeded(f"tau-{safe_name(spec)}", {"tau_init": spec}, seeds,
                            {"model": {"kwargs": {"tau_init": spec}}})
        return Protocol(name, runs, ["tau_init"], "Table 7: temperature initialisation")
    # fig4: one CMAF-Net run (first seed) whose log gives tau / entropy per head over training.
    return Protocol(name, _seeded("cmaf_net", {"model": "cmaf_net"}, seeds[:1]), ["model"],
                    "Fig. 4: temperature and attention entropy per head")


# ----------------------------------------------------------------------------- running
TrainFn = Callable[..., Any]


def _default_train() -> TrainFn:
    from wsi_cmaf.train.engine.trainer import train

    return train


def _stored_result(path: Path) -> Any:
    """The :class:`~wsi_cmaf.train.engine.trainer.TrainResult` a finished run saved as ``result.json``."""
    from wsi_cmaf.train.engine.trainer import TrainResult

    return TrainResult.from_dict(json.loads(path.read_text(encoding="utf-8")))


def run_protocol(protocol: Protocol, base: dict[str, Any], out_dir: str | Path, *,
                 base_dir: Path | None = None, progress: bool | None = None,
                 train_fn: TrainFn | None = None) -> list[dict[str, Any]]:
    """Train every run not finished yet, then write the tables and figures; returns the per-run rows.

    A run is finished when the trainer wrote ``<out>/<run>/result.json``; the folder of an
    unfinished run is resumed (``train(..., resume=True)``: from its last checkpoint if any).
    Synthetic data (``data.synthetic``) is generated once into ``<out>/synthetic_data`` unless the
    base config names a ``synthetic_dir``, so every run trains on the same patches.
    """
    from wsi_cmaf.train.paper.report import result_row, write_report

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = copy.deepcopy(base)
    data = base.get("data") or {}
    if data.get("synthetic") is not None and not data.get("synthetic_dir"):
        base = merge_dicts(base, {"data": {"synthetic_dir": str(out / "synthetic_data")}})
    # Fail early on a bad base config (and on every run's overrides) before hours of training.
    configs = [run_config(base, spec, out / spec.name, base_dir) for spec in protocol.runs]
    _write_plan(out, protocol, base)
    train = train_fn or _default_train()
    rows: list[dict[str, Any]] = []
    for i, (spec, cfg) in enumerate(zip(protocol.runs, configs), start=1):
        run_dir = out / spec.name
        done = run_dir / RESULT_FILE
        if done.is_file():
            logger.info("[%d/%d] %s: finished earlier, skipped", i, len(configs), spec.name)
            result = _stored_result(done)
        else:
            # An existing folder is an interrupted run: the trainer continues after its last
            # checkpoint (or starts over when it died before the first one).
            resume = run_dir.is_dir()
            logger.info("[%d/%d] %s: %s", i, len(configs), spec.name, "resuming" if resume else "training")
            result = train(cfg, resume=resume, progress=progress)
        rows.append(result_row(spec.name, spec.labels, result))
    write_report(protocol, rows, out)
    return rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _write_plan(out: Path, protocol: Protocol, base: dict[str, Any]) -> None:
    """``protocol.json``: what this folder holds and how it was made (runs and their overrides)."""
    from wsi_cmaf.device import resolve_device
    from wsi_cmaf.train.paper.provenance import provenance

    plan = {"protocol": protocol.name, "title": protocol.title, "group_by": protocol.group_by,
            "provenance": provenance(resolve_device(str(base.get("device") or "auto"))),
            "base": base, "runs": [dataclasses.asdict(r) for r in protocol.runs]}
    (out / "protocol.json").write_text(json.dumps(plan, indent=2, default=_jsonable) + "\n", encoding="utf-8")
