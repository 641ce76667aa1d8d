"""Merge the keyword overrides of ``analyze_slide`` / ``analyze_slides`` into an :class:`InferenceConfig`.

Rule: every override names an :class:`InferenceConfig` field and wins over the ``config=`` it is
merged into; a field not overridden keeps the config's value. A name that is not a field is an
error (it would otherwise do nothing), and every override that changes the config is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from wsi_cmaf.config_dict import check_keys, field_names
from wsi_cmaf.errors import ConfigError
from wsi_cmaf.infer.config import InferenceConfig

logger = logging.getLogger(__name__)


def merge_run_config(config: InferenceConfig | None, overrides: Mapping[str, Any], *,
                     base: InferenceConfig | None = None, caller: str = "analyze_slide") -> InferenceConfig:
    """The run's config: ``config`` (or ``base``, or the defaults) with ``overrides`` applied.

    Unknown override names raise :class:`~wsi_cmaf.errors.ConfigError` listing the valid ones;
    bad values raise the config's own named error. ``caller`` names the function in messages.
    """
    if config is not None and not isinstance(config, InferenceConfig):
        raise ConfigError(f"{caller}: config must be an InferenceConfig, got {type(config).__name__}; "
                          "build one with wsi_cmaf.InferenceConfig(...) or pass its fields as keywords")
    check_keys(overrides, field_names(InferenceConfig), where=f"{caller}: keyword argument(s)")
    start = config if config is not None else (base if base is not None else InferenceConfig())
    changed = {k: v for k, v in overrides.items() if getattr(start, k) != v}
    if not changed:
        return start
    if config is not None:
        logger.info("%s keyword arguments override config=: %s", caller,
                    ", ".join(f"{k}={v!r} (config had {getattr(config, k)!r})" for k, v in changed.items()))
    return dataclasses.replace(start, **changed)
