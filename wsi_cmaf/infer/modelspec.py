"""Turn the ``model=`` argument of ``analyze_slide`` into a ready module plus its config.

Accepted forms: a registry name (``"cmaf_net"``), a directory or ``.safetensors`` file
with ``config.json`` beside it, a WSInfer model-zoo folder (``config.json`` in WSInfer's schema +
``torchscript_model.pt``), a TorchScript file (``.pt``/``.ts``/``.torchscript``) with a
JSON config beside it or given, or an ``nn.Module`` with a config. All validation happens
here, before any slide is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_cmaf.errors import ImplausibleModelConfigError, ModelConfigError, ModelError
from wsi_cmaf.model_files import (
    CONFIG_NAME,
    DEFAULT_MODEL_DIR,
    TORCHSCRIPT_SUFFIXES,
    WEIGHTS_NAME,
    WSINFER_WEIGHTS_NAME,
    is_wsinfer_folder,
    weights_file_sha256,
)
from wsi_cmaf.model_files import sha256_file as _sha256_file
from wsi_cmaf.models import ModelConfig, create_model, load_model
from wsi_cmaf.models.wsinfer import model_config_from_dict, model_config_from_json

logger = logging.getLogger(__name__)



@dataclass
class ResolvedModel:
    """A model ready for inference and what identifies it in outputs."""

    module: nn.Module
    config: ModelConfig
    name: str
    weights_sha256: str
    untrained: bool
    #: {task: class names} of a multi-task model (primary task first, its classes = config.class_names);
    #: {} for a model with one (B, C) tensor output
    tasks: dict[str, list[str]] = field(default_factory=dict)
    #: the views of a multi-view model (wsi_cmaf.slide.views.ViewSpec, view 0 = the tile); None otherwise
    views: tuple | None = None

    @property
    def note(self) -> str:
        """Provenance of the weights, for summaries and store attributes."""
        return self.config.weights_note


def state_dict_sha256(module: nn.Module) -> str:
    """A hash of the module's tensors (names, dtypes, shapes and bytes), independent of file format."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _as_config(config: ModelConfig | dict | str | Path | None, default_arch: str) -> ModelConfig:
    if config is None:
        return ModelConfig(architecture=default_arch)
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):
        return model_config_from_dict(config)
    path = Path(config)
    if not path.is_file():
        raise ModelConfigError(f"model config {path} does not exist")
    return model_config_from_json(path)


def _check_outputs(module: nn.Module, config: ModelConfig, name: str) -> tuple[dict[str, list[str]], tuple | None]:
    """Run one tiny batch so a wrong class count fails now, not after an hour of reading.

    Returns the model's tasks ({} for a single tensor output; see :func:`task_classes`) and its
    views (None for a single-view model; :func:`wsi_cmaf.preprocess.model_views`).
    """
    from wsi_cmaf.preprocess import model_views, sample_input

    views = model_views(module, config, name)
    size = config.input_size
    try:
        with torch.inference_mode():
            out = module.eval()(*sample_input(views, size))
    except Exception as exc:  # any failure of a user's module is reported as a model error
        what = f"{len(views)} views of " if views else ""
        raise ModelError(f"model {name!r} failed on a {what}1x3x{size}x{size} input: {exc}") from exc
    if isinstance(out, dict) and out:  # {task: logits}: the engine concatenates them (infer.multitask)
        return task_classes(module, config, out, name), views
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != config.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelConfigError(
            f"model {name!r} returns {shape} but its config declares {config.num_classes} classes "
            f"{config.class_names}; fix num_classes/class_names in the config"
        )
    return {}, views


def task_classes(module: nn.Module, config: ModelConfig, out: dict[str, torch.Tensor], name: str
                 ) -> dict[str, list[str]]:
    """{task: class names} of a multi-task model's output ``out`` (primary task first).

    Class names: the config's ``class_names`` for the primary task; for the others
    ``model_kwargs.task_class_names`` (written when the model was exported), else the module's
    own ``config.task_class_names``, else ``"0", "1", ...``. A head whose width disagrees with
    its names raises :class:`ModelConfigError`.
    """
    kwargs = dict(config.model_kwargs or {})
    named = dict(kwargs.get("task_class_names") or {})
    own = getattr(getattr(module, "config", None), "task_class_names", None)
    if not named and isinstance(own, dict):
        named = dict(own)
    tasks: dict[str, list[str]] = {}
    for i, (task, logits) in enumerate(out.items()):
        n = int(logits.shape[1]) if isinstance(logits, torch.Tensor) and logits.ndim == 2 else -1
        classes = list(config.class_names) if i == 0 else [str(c) for c in named.get(task, range(max(n, 0)))]
        if n != len(classes):
            raise ModelConfigError(f"model {name!r}: task {task!r} returns {n} classes but {len(classes)} are named "
                                   f"({classes}); fix class_names / model_kwargs.task_class_names")
        tasks[str(task)] = classes
    return tasks


def default_model() -> ResolvedModel:
    """The project's default: the packaged checkpoint if present, else untrained CMAF-Net."""
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return resolve_model(DEFAULT_MODEL_DIR)
    return resolve_model("cmaf_net")


def resolve_model(
    model: str | Path | nn.Module | None = None,
    config: ModelConfig | dict | str | Path | None = None,
) -> ResolvedModel:
    """Resolve any accepted model form; raises ModelError/ModelConfigError on bad input."""
    if isinstance(model, ResolvedModel):
        return model
    if model is None:
        return default_model()
    if isinstance(model, nn.Module):
        cfg = _as_config(config, type(model).__name__)
        if config is None:
            logger.warning("no config given with the nn.Module; using default geometry %s", cfg)
        tasks, views = _check_outputs(model, cfg, cfg.architecture)
        return ResolvedModel(model, cfg, cfg.architecture, state_dict_sha256(model), untrained=False,
                             tasks=tasks, views=views)
    path = Path(model)
    _check_config_beside(path)
    if path.exists():
        if is_wsinfer_folder(path) and not (path / WEIGHTS_NAME).is_file():
            path = path / WSINFER_WEIGHTS_NAME  # WSInfer's model-zoo layout: TorchScript + config.json
        if path.suffix in TORCHSCRIPT_SUFFIXES:
            cfg_path = config if config is not None else _torchscript_config(path)
            cfg = _with_note(_as_config(cfg_path, "torchscript"), cfg_path, path)
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except (RuntimeError, ValueError) as exc:
                raise ModelError(f"{path}: not a loadable TorchScript file ({exc})") from exc
            tasks, views = _check_outputs(module, cfg, path.name)
            return ResolvedModel(module, cfg, cfg.architecture, _sha256_file(path), untrained=False,
                                 tasks=tasks, views=views)
        module, cfg = load_model(path)
        weights = path if path.is_file() else path / WEIGHTS_NAME
        cfg_file = path / CONFIG_NAME if path.is_dir() else None
        cfg = _with_note(cfg, cfg_file, weights)
        tasks, views = _check_outputs(module, cfg, cfg.architecture)
        untrained = cfg.weights_note.strip().lower().startswith("untrained")
        return ResolvedModel(module, cfg, cfg.architecture, _sha256_file(weights), untrained, tasks, views)
    if isinstance(model, str) and not any(sep in model for sep in "/\\"):
        cfg = _as_config(config, model)
        overrides: dict[str, Any] = dict(cfg.model_kwargs)
        module = create_model(model, num_classes=cfg.num_classes, **overrides)
        cfg = _with_arch(cfg, model)
        logger.warning(
            "model %r has UNTRAINED (randomly initialised) weights: its probabilities mean nothing", model
        )
        tasks, views = _check_outputs(module, cfg, model)
        return ResolvedModel(module, cfg, model, state_dict_sha256(module), untrained=True, tasks=tasks, views=views)
    raise ModelError(f"model {model!s} is neither an existing file/directory nor a registered model name")


def _torchscript_config(path: Path) -> Path:
    """The JSON config of a TorchScript file: ``<stem>.json`` beside it, else ``config.json``
    in its folder (WSInfer's model-zoo layout)."""
    own = path.with_suffix(".json")
    return own if own.is_file() or not (path.parent / CONFIG_NAME).is_file() else path.parent / CONFIG_NAME


def _with_note(cfg: ModelConfig, cfg_path: Any, weights: Path) -> ModelConfig:
    """``cfg`` with a weights note that says where the weights came from when its JSON file gave
    none: weights loaded from a file are not "untrained" just because nobody wrote a note."""
    if not isinstance(cfg_path, (str, Path)) or not Path(cfg_path).is_file() or cfg.translated_from:
        return cfg
    try:
        raw = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):  # already parsed once; keep the config as it is
        return cfg
    if isinstance(raw, dict) and "weights_note" not in raw:
        return dataclasses.replace(cfg, weights_note=f"weights from {weights.name}, note not given")
    return cfg


def _check_config_beside(path: Path) -> None:
    """Parse the ``config.json`` of a weights directory / ``.safetensors`` path first, so a malformed
    config is reported as such (ModelConfigError), even when the weights are missing as well."""
    if path.is_dir():
        candidates = [path / "config.json"]
    elif path.suffix == ".safetensors":
        candidates = [path.with_suffix(".json"), path.parent / "config.json"]
    else:
        return
    cfg = next((c for c in candidates if c.is_file()), None)
    if cfg is None:
        return
    try:
        model_config_from_json(cfg)
    except ImplausibleModelConfigError as exc:  # well formed, but not a size any model uses
        raise ImplausibleModelConfigError(f"{cfg}: {str(exc).removeprefix(f'{cfg}: ')}") from exc
    except ModelConfigError as exc:
        why = str(exc).removeprefix(f"{cfg}: ")
        raise ModelConfigError(f"{cfg}: malformed model config ({why}); fix or replace this file") from exc


def quick_weights_sha256(model: Any) -> str | None:
    """The ``weights_sha256`` that :func:`resolve_model` would report, without building the model.

    Hashing a weights file takes milliseconds while loading and checking the model takes much
    longer; a batch rerun compares this with its status table to skip finished slides. None
    when only building the model tells (registry names: their random initialisation).
    """
    if isinstance(model, ResolvedModel):
        return model.weights_sha256
    if isinstance(model, nn.Module):
        return state_dict_sha256(model)
    return weights_file_sha256(model) if model is None or isinstance(model, (str, Path)) else None


def _with_arch(cfg: ModelConfig, arch: str) -> ModelConfig:
    d = cfg.to_dict()
    d["architecture"] = arch
    if not str(d.get("weights_note", "")).lower().startswith("untrained"):
        d["weights_note"] = "untrained (random initialisation)"
    return ModelConfig.from_dict(d)


def config_identity(cfg: ModelConfig) -> dict[str, Any]:
    """The JSON view of a config that must match for a store to be resumed."""
    return json.loads(json.dumps(cfg.to_dict(), sort_keys=True, default=str))
