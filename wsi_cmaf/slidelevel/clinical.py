"""Clinical variables: a declared schema and its encoding (fit on the training patients only).

Schema file (JSON or YAML)::

    {"variables": [
        {"name": "grade", "type": "categorical", "categories": ["1", "2", "3"]},
        {"name": "age", "type": "continuous"}]}

Encoding, variable by variable (in schema order):

* categorical with K categories -> K one-hot columns + 1 explicit ``missing`` indicator;
* continuous -> (value - mean) / std with mean and std of the *training* patients' observed
  values (0 when missing) + 1 ``missing`` indicator.

A patient counts as having clinical data (``present``) when at least one variable is observed;
without it, the fused model predicts from the image alone and says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_cmaf.errors import ConfigError, DataError

TYPES = ("categorical", "continuous")


@dataclass(frozen=True)
class Variable:
    """One declared clinical variable."""

    name: str
    type: str
    categories: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """Number of encoded columns."""
        return len(self.categories) + 1 if self.type == "categorical" else 2


@dataclass(frozen=True)
class ClinicalSchema:
    """The declared variables, in encoding order."""

    variables: tuple[Variable, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClinicalSchema:
        """Validate and build (errors name the variable and what to fix)."""
        raw = d.get("variables") if isinstance(d, dict) else None
        if not isinstance(raw, list) or not raw:
            raise ConfigError("a clinical schema needs a non-empty 'variables' list")
        out, seen = [], set()
        for i, v in enumerate(raw):
            name, kind = (v or {}).get("name"), (v or {}).get("type")
            if not isinstance(name, str) or not name or name in seen:
                raise ConfigError(f"clinical variable #{i}: missing or duplicate name {name!r}")
            if kind not in TYPES:
                raise ConfigError(f"clinical variable {name!r}: type must be one of {TYPES}, got {kind!r}")
            cats = tuple(str(c) for c in v.get("categories") or ())
            if kind == "categorical" and (len(cats) < 2 or len(set(cats)) != len(cats)):
                raise ConfigError(f"clinical variable {name!r}: a categorical variable needs at least two "
                                  f"distinct 'categories', got {list(cats)}")
            if kind == "continuous" and cats:
                raise ConfigError(f"clinical variable {name!r}: a continuous variable takes no categories")
            seen.add(name)
            out.append(Variable(name, kind, cats))
        return cls(tuple(out))

    @classmethod
    def load(cls, path: str | Path) -> ClinicalSchema:
        """Read a JSON (``.json``) or YAML (other suffixes) schema file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read clinical schema {path}: {exc}") from exc
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError are ValueErrors here
            raise ConfigError(f"{path}: not a valid schema file ({exc})") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (inverse of :meth:`from_dict`)."""
        return {"variables": [{"name": v.name, "type": v.type, **({"categories": list(v.categories)}
                                                                   if v.categories else {})}
                              for v in self.variables]}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in {"", "na", "nan", "none", "null", "missing"}


def _category(value: Any) -> str:
    """CSV readers turn "2" into 2 or 2.0; categories are compared as their plain text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@dataclass
class ClinicalEncoder:
    """Encodes a clinical table by a schema; continuous statistics come from :meth:`fit`."""

    schema: ClinicalSchema
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """Names of the encoded columns."""
        cols: list[str] = []
        for v in self.schema.variables:
            cols += [f"{v.name}={c}" for c in v.categories] if v.type == "categorical" else [v.name]
            cols.append(f"{v.name}:missing")
        return cols

    @property
    def groups(self) -> list[tuple[str, slice]]:
        """(variable name, its columns) in encoding order: one token / one SHAP feature each."""
        out, start = [], 0
        for v in self.schema.variables:
            out.append((v.name, slice(start, start + v.width)))
            start += v.width
        return out

    @property
    def width(self) -> int:
        """Total number of encoded columns."""
        return sum(v.width for v in self.schema.variables)

    def fit(self, table: pd.DataFrame) -> ClinicalEncoder:
        """Mean and std (population) of each continuous variable over ``table``'s observed values."""
        for v in self.schema.variables:
            if v.type != "continuous":
                continue
            vals = self._numbers(table, v)
            vals = vals[np.isfinite(vals)]
            if len(vals) == 0:
                raise DataError(f"clinical variable {v.name!r} has no observed value in the training patients")
            std = float(vals.std())
            self.means[v.name], self.stds[v.name] = float(vals.mean()), std if std > 0 else 1.0
        return self

    @staticmethod
    def _numbers(table: pd.DataFrame, v: Variable) -> np.ndarray:
        if v.name not in table:
            return np.full(len(table), np.nan)
        raw = table[v.name].to_numpy(dtype=object)
        out = np.full(len(raw), np.nan)
        for i, x in enumerate(raw):
            if _is_missing(x):
                continue
            try:
                out[i] = float(x)
            except (TypeError, ValueError) as exc:
                raise DataError(f"clinical variable {v.name!r} is continuous but row {i} holds {x!r}") from exc
        return out

    def transform(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(X float32 (n, width), present bool (n,))`` for ``table`` (one row per patient).

        Columns the table lacks count as missing for every patient. A category outside the schema
        raises :class:`DataError` (fix the table or declare the category).
        """
        missing_stats = [v.name for v in self.schema.variables if v.type == "continuous" and v.name not in self.means]
        if missing_stats:
            raise DataError(f"the clinical encoder was not fitted for {missing_stats}; "
                            "call fit() on the training table")
        n = len(table)
        x = np.zeros((n, self.width), np.float32)
        observed = np.zeros(n, bool)
        for v, (_, cols) in zip(self.schema.variables, self.groups):
            if v.type == "categorical":
                raw = table[v.name].to_numpy(dtype=object) if v.name in table else np.full(n, None, object)
                for i, value in enumerate(raw):
                    if _is_missing(value):
                        x[i, cols.stop - 1] = 1.0
                        continue
                    cat = _category(value)
                    if cat not in v.categories:
                        raise DataError(f"clinical variable {v.name!r}: value {value!r} (row {i}) is not one of "
                                        f"the declared categories {list(v.categories)}")
                    x[i, cols.start + v.categories.index(cat)] = 1.0
                    observed[i] = True
            else:
                vals = self._numbers(table, v)
                ok = np.isfinite(vals)
                x[ok, cols.start] = (vals[ok] - self.means[v.name]) / self.stds[v.name]
                x[~ok, cols.start + 1] = 1.0
                observed |= ok
        return x, observed

    def missing_row(self) -> np.ndarray:
        """The encoding of a patient with every variable missing (the SHAP baseline)."""
        x, _ = self.transform(pd.DataFrame({v.name: [None] for v in self.schema.variables}))
        return x[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view: schema plus the training statistics."""
        return {"schema": self.schema.to_dict(), "means": dict(self.means), "stds": dict(self.stds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClinicalEncoder:
        """Inverse of :meth:`to_dict`."""
        return cls(ClinicalSchema.from_dict(d["schema"]), dict(d.get("means", {})), dict(d.get("stds", {})))
