"""JSON helpers of the heatmap store: normalising values and describing how two documents differ."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

__all__ = ["jsonable", "json_diff"]


def jsonable(obj: Any) -> Any:
    """Normalise ``obj`` to plain JSON types (tuples -> lists, numpy -> Python, other -> str)."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, sort_keys=True, default=default))


def json_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON values (paths joined with '.')."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: absent in store, requested {_short(new[key])}")
            elif key not in new:
                out.append(f"{where}: store has {_short(old[key])}, absent in request")
            else:
                out.extend(json_diff(old[key], new[key], where))
        return out
    return [] if old == new else [f"{prefix or 'value'}: store has {_short(old)}, requested {_short(new)}"]


def _short(v: Any, n: int = 70) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= n else s[: n - 3] + "..."
