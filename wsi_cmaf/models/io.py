"""Save / load models as ``model.safetensors`` + ``config.json`` (never pickle)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from wsi_cmaf.errors import ModelConfigError, ModelError
from wsi_cmaf.model_files import CONFIG_NAME, WEIGHTS_NAME
from wsi_cmaf.models.config import ModelConfig
from wsi_cmaf.models.registry import create_model
from wsi_cmaf.models.wsinfer import model_config_from_json

logger = logging.getLogger(__name__)



def _model_num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def save_model(model: nn.Module, config: ModelConfig, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns the directory.

    For CMAF-Net the architecture fields actually used are written into ``model_kwargs`` (so the
    file always rebuilds the same network, whatever the caller's config said).
    """
    config.validate()
    n = _model_num_classes(model)
    if n is not None and n != config.num_classes:
        raise ModelConfigError(
            f"model has {n} outputs but the config declares {config.num_classes} classes {config.class_names}"
        )
    arch_to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    if callable(arch_to_dict):
        actual = arch_to_dict()
        if config.model_kwargs and config.model_kwargs != actual:
            logger.warning("config.model_kwargs differ from the model's own config; saving the model's")
        config = ModelConfig.from_dict({**config.to_dict(), "model_kwargs": actual})
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_NAME),
              metadata={"architecture": config.architecture, "format": "pt"})
    config.to_json(out / CONFIG_NAME)
    logger.info("saved %s (%d tensors) to %s", config.architecture, len(tensors), out)
    return out


def _locate(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        weights, cfg = path / WEIGHTS_NAME, path / CONFIG_NAME
    elif path.suffix == ".safetensors":
        weights = path
        cfg = path.with_suffix(".json") if path.with_suffix(".json").is_file() else path.parent / CONFIG_NAME
    else:
        raise ModelError(f"{path}: expected a model directory or a .safetensors file")
    if not weights.is_file():
        if path.is_dir():
            # a WSInfer model-zoo folder is loaded as TorchScript by infer.modelspec.resolve_model
            raise ModelError(f"{weights}: weights file not found (nor torchscript_model.pt of a WSInfer "
                             "model folder); put the model's weights in this folder")
        raise ModelError(f"{weights}: weights file not found")
    if not cfg.is_file():
        raise ModelConfigError(f"{cfg}: config file not found next to the weights {weights.name}")
    return weights, cfg


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Rebuild the model named in ``config.json`` and load its safetensors weights (eval mode).

    Raises :class:`ModelConfigError` when config and weights disagree (missing/extra tensors,
    wrong shapes, e.g. a different ``num_classes``) — before any slide is read.
    """
    weights, cfg_path = _locate(Path(path))
    config = model_config_from_json(cfg_path)
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: not a readable safetensors file ({exc})") from exc
    model = create_model(config.architecture, num_classes=config.num_classes, **config.model_kwargs)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append("shape mismatch " + "; ".join(wrong[:5]))
        if missing:
            details.append(f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise ModelConfigError(
            f"{cfg_path} does not match the weights {weights.name} "
            f"(architecture {config.architecture!r}, num_classes {config.num_classes}): " + ", ".join(details)
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    logger.info("loaded %s from %s (%s)", config.architecture, weights, config.weights_note)
    return model, config


def read_config(path: str | Path) -> ModelConfig:
    """Only the :class:`ModelConfig` of a saved model (cheap; no weights touched)."""
    return model_config_from_json(_locate(Path(path))[1])


__all__ = ["save_model", "load_model", "read_config", "WEIGHTS_NAME", "CONFIG_NAME"]
