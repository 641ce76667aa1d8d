"""Merge ``analyze_slide``'s keyword arguments with an :class:`InferenceConfig` given as ``config=``.

Rule: an argument the caller passed explicitly overrides the config's field; an argument left at
its default takes the config's value. Nothing is ignored silently: every override is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from wsi_cmaf.errors import ConfigError
from wsi_cmaf.infer.config import InferenceConfig

logger = logging.getLogger(__name__)


class _Unset:
    """Marks a keyword argument the caller did not pass (its default is then used)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()
#: analyze_slide's defaults for the arguments that are also InferenceConfig fields.
DEFAULTS = {"device": "auto", "batch_size": 256, "stain": "auto", "progress": True, "embeddings": False}


def _stain_field(stain: str | None) -> str | None:
    """analyze_slide's ``stain`` ("auto" | "macenko" | None) -> InferenceConfig.stain."""
    if stain == "auto":
        return None
    if stain is None or stain == "none":
        return "none"
    if stain == "macenko":
        return "macenko"
    raise ConfigError(f"stain must be 'auto', 'macenko', 'none' or None, got {stain!r}")


def merge_run_config(config: InferenceConfig | None, **given: Any) -> InferenceConfig:
    """The run's config: ``config`` (or the defaults) with every explicitly given argument applied.

    ``given`` holds ``device``, ``batch_size``, ``stain``, ``progress``, ``embeddings`` as passed to
    ``analyze_slide`` (:data:`UNSET` when not passed).
    """
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"merge_run_config got unknown argument(s) {unknown}")
    explicit = {k: v for k, v in given.items() if v is not UNSET}
    if config is not None and not isinstance(config, InferenceConfig):
        raise ConfigError(f"config must be an InferenceConfig, got {type(config).__name__}")
    base = config if config is not None else InferenceConfig()
    if config is None:  # no config: the function's own defaults apply to what was not passed
        explicit = {**DEFAULTS, **explicit}
    fields = {k: (_stain_field(v) if k == "stain" else v) for k, v in explicit.items()}
    changed = {k: v for k, v in fields.items() if getattr(base, k) != v}
    if config is not None and changed:
        logger.info("analyze_slide arguments override config=: %s",
                    ", ".join(f"{k}={v!r} (config had {getattr(config, k)!r})" for k, v in changed.items()))
    return dataclasses.replace(base, **changed) if changed else base
