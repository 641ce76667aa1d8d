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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_cmaf.errors import ModelConfigError, ModelError
from wsi_cmaf.models import ModelConfig, create_model, load_model
from wsi_cmaf.models.io import CONFIG_NAME, WEIGHTS_NAME
from wsi_cmaf.models.wsinfer import WSINFER_WEIGHTS_NAME, is_wsinfer_folder

logger = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = {".pt", ".ts", ".torchscript", ".jit"}
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "weights" / "default"


@dataclass
class ResolvedModel:
    """A model ready for inference and what identifies it in outputs."""

    module: nn.Module
    config: ModelConfig
    name: str
    weights_sha256: str
    untrained: bool

    @property
    def note(self) -> str:
        """Provenance of the weights, for summaries and store attributes."""
        return self.config.weights_note


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        return ModelConfig.from_dict(config)
    path = Path(config)
    if not path.is_file():
        raise ModelConfigError(f"model config {path} does not exist")
    return ModelConfig.from_json(path)


def _check_outputs(module: nn.Module, config: ModelConfig, name: str) -> None:
    """Run one tiny batch so a wrong class count fails now, not after an hour of reading."""
    x = torch.zeros(1, 3, config.input_size, config.input_size)
    try:
        with torch.inference_mode():
            out = module.eval()(x)
    except Exception as exc:  # any failure of a user's module is reported as a model error
        raise ModelError(
            f"model {name!r} failed on a 1x3x{config.input_size}x{config.input_size} input: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != config.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelConfigError(
            f"model {name!r} returns {shape} but its config declares {config.num_classes} classes "
            f"{config.class_names}; fix num_classes/class_names in the config"
        )


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
        _check_outputs(model, cfg, cfg.architecture)
        return ResolvedModel(model, cfg, cfg.architecture, state_dict_sha256(model), untrained=False)
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
            _check_outputs(module, cfg, path.name)
            return ResolvedModel(module, cfg, cfg.architecture, _sha256_file(path), untrained=False)
        module, cfg = load_model(path)
        weights = path if path.is_file() else path / WEIGHTS_NAME
        cfg_file = path / CONFIG_NAME if path.is_dir() else None
        cfg = _with_note(cfg, cfg_file, weights)
        _check_outputs(module, cfg, cfg.architecture)
        untrained = cfg.weights_note.strip().lower().startswith("untrained")
        return ResolvedModel(module, cfg, cfg.architecture, _sha256_file(weights), untrained)
    if isinstance(model, str) and not any(sep in model for sep in "/\\"):
        cfg = _as_config(config, model)
        overrides: dict[str, Any] = dict(cfg.model_kwargs)
        module = create_model(model, num_classes=cfg.num_classes, **overrides)
        cfg = _with_arch(cfg, model)
        logger.warning(
            "model %r has UNTRAINED (randomly initialised) weights: its probabilities mean nothing", model
        )
        _check_outputs(module, cfg, model)
        return ResolvedModel(module, cfg, model, state_dict_sha256(module), untrained=True)
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
        ModelConfig.from_json(cfg)
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
    if model is None:
        if (DEFAULT_MODEL_DIR / "config.json").is_file():
            return quick_weights_sha256(DEFAULT_MODEL_DIR)
        return None
    path = Path(model)
    if not path.exists():
        return None
    if path.suffix in TORCHSCRIPT_SUFFIXES or path.is_file():
        return _sha256_file(path) if path.is_file() else None
    weights = path / WEIGHTS_NAME
    if not weights.is_file() and is_wsinfer_folder(path):
        weights = path / WSINFER_WEIGHTS_NAME
    return _sha256_file(weights) if weights.is_file() else None


def _with_arch(cfg: ModelConfig, arch: str) -> ModelConfig:
    d = cfg.to_dict()
    d["architecture"] = arch
    if not str(d.get("weights_note", "")).lower().startswith("untrained"):
        d["weights_note"] = "untrained (random initialisation)"
    return ModelConfig.from_dict(d)


def config_identity(cfg: ModelConfig) -> dict[str, Any]:
    """The JSON view of a config that must match for a store to be resumed."""
    return json.loads(json.dumps(cfg.to_dict(), sort_keys=True, default=str))
