"""Building a config dataclass from a parsed mapping (JSON, YAML, store attributes), strictly.

Every config in the package is built through :func:`from_dict`, so a misspelt key fails the same
way everywhere: a named error that lists the unknown keys and the valid ones, instead of a key
that is silently ignored and a run that does something other than what was asked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from wsi_cmaf.errors import ConfigError

T = TypeVar("T")

__all__ = ["PRECISIONS", "check_keys", "field_names", "from_dict"]

#: the precision settings that inference, training and the CLI all accept (one spelling everywhere);
#: what "auto" resolves to depends on the run (see wsi_cmaf.device.autocast_dtype and
#: wsi_cmaf.train.engine.amp.resolve_precision)
PRECISIONS = ("auto", "bf16", "fp16", "off")


def field_names(cls: type) -> frozenset[str]:
    """The init field names of dataclass ``cls``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return frozenset(f.name for f in dataclasses.fields(cls) if f.init)


def check_keys(data: Mapping[str, Any], valid: Iterable[str], *, where: str,
               error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` naming the keys of ``data`` outside ``valid`` (and the valid ones), if any.

    ``where`` names the config in the message (e.g. ``"training config: optim"``).
    """
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a mapping of option -> value, got {type(data).__name__}")
    valid = set(valid)
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        raise error(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(valid)} "
                    "(fix the spelling or remove them)")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str,
              error: type[Exception] = ConfigError) -> T:
    """``cls(**data)`` for dataclass ``cls``, refusing unknown keys.

    ``None`` means "all defaults". Unknown keys, and values the constructor refuses with a
    ``TypeError``, raise ``error`` (the caller's named config error); errors raised by the
    dataclass's own checks pass through unchanged.
    """
    data = {} if data is None else data
    check_keys(data, field_names(cls), where=where, error=error)
    try:
        return cls(**data)
    except TypeError as exc:
        raise error(f"{where}: {exc}") from exc
