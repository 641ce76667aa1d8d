"""WSInfer model-zoo configs and folders, translated into wsi-cmaf's :class:`ModelConfig`.

A WSInfer model folder holds ``config.json`` (WSInfer's schema, ``spec_version`` "1.0") and
``torchscript_model.pt``. WSInfer reads every patch as a square level-0 region of
``P = round(patch_size_pixels * spacing_um_px / m)`` px (``m`` the mean of the slide's x and y
µm/px), patch ``k`` at level-0 px ``k * P``, converts it to RGB and applies the config's
``transform`` (torchvision ``Resize`` -> ``ToTensor`` -> ``Normalize``) to the PIL image. The
translation reproduces that exactly where it can and refuses what it cannot:

* ``Resize(size)`` -> ``input_size`` with antialiased bilinear resizing: ``"pil_bilinear"``
  (rounded to uint8, as PIL does) when it comes before ``ToTensor`` (WSInfer resizes the PIL
  image), ``"bilinear"`` (float, torchvision's tensor ``Resize(antialias=True)``) after it;
* ``ToTensor`` -> the /255 scaling (folded into mean/std by the preprocessor);
* ``Normalize(mean, std)`` -> ``mean``/``std``;
* no stain normalisation, ``patch_source="level0"``: tiles cut from full-resolution reads at
  WSInfer's corners (:mod:`wsi_cmaf.slide.level0`), so tile ``(r, c)`` is WSInfer's patch at
  ``(c * P, r * P)``.

Anything else (another transform, a non-square or non-bilinear resize, a missing ``Resize``) is a
:class:`UnsupportedTransformError` naming what is supported.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wsi_cmaf.errors import ImplausibleModelConfigError, ModelConfigError
from wsi_cmaf.model_files import WSINFER_WEIGHTS_NAME, is_wsinfer_folder
from wsi_cmaf.models.config import ModelConfig, read_config_json

logger = logging.getLogger(__name__)

WSINFER_SPEC_VERSIONS = ("1.0",)
SUPPORTED_TRANSFORMS = ("Resize", "ToTensor", "Normalize")
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "spec_version": str, "architecture": str, "num_classes": int, "class_names": list,
    "patch_size_pixels": int, "spacing_um_px": (int, float), "transform": list,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {"description": str}


class WSInferConfigError(ModelConfigError):
    """A WSInfer model config does not follow WSInfer's schema (missing/unknown/wrongly typed fields)."""


class UnsupportedTransformError(WSInferConfigError):
    """A WSInfer ``transform`` step that wsi-cmaf cannot reproduce exactly."""


def is_wsinfer_config(data: Any) -> bool:
    """Whether ``data`` (a parsed config.json) is in WSInfer's format (it has a ``transform`` list)."""
    return isinstance(data, dict) and "transform" in data


def _check_schema(data: dict[str, Any], where: str) -> None:
    problems: list[str] = []
    missing = sorted(k for k in _REQUIRED if k not in data)
    if missing:
        problems.append(f"missing field(s) {missing}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        problems.append(f"unknown field(s) {unknown} (WSInfer's schema has {sorted({**_REQUIRED, **_OPTIONAL})})")
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            problems.append(f"{key} has the wrong type ({type(value).__name__})")
    if isinstance(data.get("spec_version"), str) and data["spec_version"] not in WSINFER_SPEC_VERSIONS:
        problems.append(f"spec_version {data['spec_version']!r} is not one of {WSINFER_SPEC_VERSIONS}")
    if problems:
        raise WSInferConfigError(f"{where}: not a valid WSInfer model config: " + "; ".join(problems))


def _resize_size(args: dict[str, Any], where: str) -> int:
    size = args.get("size")
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise UnsupportedTransformError(
            f"{where}: Resize size {args.get('size')!r} is not supported; give one int >= 8 (a square input)")
    interpolation = str(args.get("interpolation", "bilinear")).lower().rsplit(".", 1)[-1]
    if interpolation != "bilinear":
        raise UnsupportedTransformError(
            f"{where}: Resize interpolation {args.get('interpolation')!r} is not supported; only bilinear "
            "(WSInfer's default) is reproduced exactly")
    extra = sorted(set(args) - {"size", "interpolation", "antialias"})
    if extra or args.get("antialias", True) is not True:
        raise UnsupportedTransformError(
            f"{where}: Resize arguments {sorted(args)} are not supported; only size, "
            "interpolation='bilinear' and antialias=true are")
    return size


def translate_wsinfer_config(data: dict[str, Any], source: str | Path | None = None,
                             weights_name: str | None = None) -> ModelConfig:
    """A :class:`ModelConfig` that feeds the model what WSInfer would; the translation is recorded
    in ``translated_from``. Raises :class:`WSInferConfigError` / :class:`UnsupportedTransformError`."""
    where = str(source) if source is not None else "WSInfer config"
    _check_schema(data, where)
    input_size: int | None = None
    interpolation = "bilinear"
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    seen: list[str] = []
    notes: list[str] = []
    for i, step in enumerate(data["transform"]):
        name = step.get("name") if isinstance(step, dict) else None
        args = (step.get("arguments") or {}) if isinstance(step, dict) else {}
        if name not in SUPPORTED_TRANSFORMS or not isinstance(args, dict):
            raise UnsupportedTransformError(
                f"{where}: transform[{i}] {name!r} is not supported; supported transforms: "
                f"{list(SUPPORTED_TRANSFORMS)} (each at most once, Normalize after ToTensor)")
        if name in seen:
            raise UnsupportedTransformError(f"{where}: transform {name} appears twice; give each at most once")
        if name == "Resize":
            input_size = _resize_size(args, where)
            # before ToTensor torchvision resizes the PIL image: PIL's filter, rounded to uint8
            interpolation = "pil_bilinear" if "ToTensor" not in seen else "bilinear"
            notes.append(f"Resize(size={input_size}) -> input_size={input_size}, "
                         f"resize_interpolation={interpolation!r} (antialiased bilinear)")
        elif name == "Normalize":
            if "ToTensor" not in seen:
                raise UnsupportedTransformError(f"{where}: Normalize comes before ToTensor; it must follow it")
            mean, std = tuple(args.get("mean", ())), tuple(args.get("std", ()))
            if len(mean) != 3 or len(std) != 3:
                raise UnsupportedTransformError(f"{where}: Normalize needs 3 mean and 3 std values")
            notes.append(f"Normalize(mean={list(mean)}, std={list(std)}) -> mean/std")
        elif args:
            raise UnsupportedTransformError(f"{where}: ToTensor takes no arguments, got {sorted(args)}")
        else:
            notes.append("ToTensor -> pixels / 255")
        seen.append(name)
    if "ToTensor" not in seen:
        raise UnsupportedTransformError(f"{where}: transform has no ToTensor; the model's input would not be a tensor")
    if input_size is None:
        raise UnsupportedTransformError(
            f"{where}: transform has no Resize; wsi-cmaf needs a fixed model input size: add "
            "{\"name\": \"Resize\", \"arguments\": {\"size\": N}}")
    notes += ["no stain normalisation", "patches read at level 0 (patch_source='level0') as WSInfer places them: "
              "P = round(patch_size_pixels * spacing_um_px / mean slide µm/px) level-0 px, patch k at k * P"]
    n = data["num_classes"]
    weights = weights_name or WSINFER_WEIGHTS_NAME
    try:
        return ModelConfig(
            architecture=data["architecture"], num_classes=n, class_names=list(data["class_names"]),
            positive_class=1 if n > 1 else 0, spacing_um_px=float(data["spacing_um_px"]),
            patch_size_pixels=data["patch_size_pixels"], input_size=input_size, resize_interpolation=interpolation,
            mean=mean, std=std, stain_normalization=None, patch_source="level0",
            weights_note=f"weights from {weights} (WSInfer model config), note not given",
            translated_from={"format": "wsinfer", "source": str(source) if source is not None else None,
                             "original": data, "translation": notes},
        )
    except ImplausibleModelConfigError as exc:  # e.g. Resize to 200,000 px: refused before any allocation
        raise ImplausibleModelConfigError(f"{where}: {exc}") from exc
    except ModelConfigError as exc:
        raise WSInferConfigError(f"{where}: {exc}") from exc


def model_config_from_dict(data: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a parsed ``config.json`` in either format: a WSInfer model-zoo
    config (it has a ``transform`` list) is translated, anything else must be wsi-cmaf's own."""
    if is_wsinfer_config(data):
        return translate_wsinfer_config(data)
    return ModelConfig.from_dict(data)


def model_config_from_json(source: str | Path) -> ModelConfig:
    """:func:`model_config_from_dict` of a JSON file (or of JSON text starting with ``{``)."""
    return model_config_from_dict(read_config_json(source))


__all__ = ["translate_wsinfer_config", "model_config_from_dict", "model_config_from_json", "is_wsinfer_config",
           "is_wsinfer_folder", "WSInferConfigError",
           "UnsupportedTransformError", "SUPPORTED_TRANSFORMS", "WSINFER_WEIGHTS_NAME"]
