"""Provenance of every output: model + weights hash, slide fingerprint, versions, invocation, time.

The same dictionary goes into the summary JSON, the GeoJSON FeatureCollection's
``properties`` and the overlay PNG's text chunks, so any one file says how it was made
without the store beside it. Versions are read from package metadata (no import of torch
or OpenSlide just to learn a version string).
"""

from __future__ import annotations

import logging
import shlex
import sys
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: distributions whose versions are recorded (package name -> distribution name)
_PACKAGES = {"wsi_cmaf": "wsi-cmaf", "torch": "torch", "openslide_python": "openslide-python",
             "openslide_bin": "openslide-bin", "tiffslide": "tiffslide", "zarr": "zarr"}

_command_line: list[str] | None = None


def set_command_line(argv: list[str] | None) -> None:
    """Record the CLI invocation (``["wsi-cmaf", verb, ...]``); None clears it (API use)."""
    global _command_line
    _command_line = None if argv is None else [str(a) for a in argv]


def invocation(api_call: str | None = None) -> dict[str, str]:
    """How this run was started: the command line when the CLI is running, else ``api_call``."""
    if _command_line is not None:
        return {"command_line": shlex.join(_command_line)}
    return {"api_call": api_call or shlex.join(sys.argv)}


def api_call(func: str, *args: Any, **kwargs: Any) -> str:
    """``func('a', k=v)`` as text (paths made absolute), for :func:`invocation`."""
    def show(v: Any) -> str:
        return repr(str(Path(v).absolute())) if isinstance(v, Path) else repr(v)

    parts = [show(a) for a in args] + [f"{k}={show(v)}" for k, v in kwargs.items() if v is not None]
    return f"{func}({', '.join(parts)})"


def versions() -> dict[str, str | None]:
    """Versions of wsi-cmaf, torch, OpenSlide (python binding and library wheel), tiffslide, zarr, Python."""
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    # installed versions do not change while a process runs; reading metadata costs ~10 ms
    out: dict[str, str | None] = {}
    for key, dist in _PACKAGES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    if out["wsi_cmaf"] is None:  # running from a source tree that is not installed
        from wsi_cmaf import __version__

        out["wsi_cmaf"] = __version__
    out["python"] = sys.version.split()[0]
    return out


def utc_now() -> str:
    """Current UTC time, ISO 8601 with a ``Z`` suffix, to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_provenance(*, model_name: str, weights_sha256: str | None, weights_note: str | None,
                   slide_path: str | Path, slide_fingerprint: str | None, store_path: str | Path | None,
                   call: str | None = None) -> dict[str, Any]:
    """Provenance of one analysis run (stored in the heatmap store's attributes)."""
    return {
        "model": {"name": model_name, "weights_sha256": weights_sha256, "weights_note": weights_note},
        "slide": {"path": str(Path(slide_path).absolute()), "fingerprint": slide_fingerprint},
        "store": None if store_path is None else str(Path(store_path).absolute()),
        "software": versions(),
        "invocation": invocation(call),
        "created_utc": utc_now(),
    }


def store_provenance(store: Any) -> dict[str, Any]:
    """The analysis provenance recorded in ``store`` at finalize; rebuilt from its attributes for a
    store that records none (one written through :class:`HeatmapStore` directly, not by an analysis)."""
    attrs = store.attrs
    recorded = attrs.get("provenance")
    if isinstance(recorded, dict):
        return dict(recorded)
    model = attrs.get("model") or {}
    slide = attrs.get("slide") or {}
    return {
        "model": {"name": model.get("name"), "weights_sha256": model.get("weights_sha256"),
                  "weights_note": model.get("weights_note")},
        "slide": {"path": slide.get("path"),
                  "fingerprint": slide.get("fingerprint") or store.identity.get("slide_fingerprint")},
        "store": str(Path(store.path).absolute()),
        "software": {"wsi_cmaf": (attrs.get("software") or {}).get("wsi_cmaf")},
        "created_utc": attrs.get("finalized_at"),
    }


def export_provenance(store: Any, output: str | Path, *, call: str | None = None) -> dict[str, Any]:
    """Provenance of a file exported from ``store``: the analysis's, plus this export's own.

    The export part says which command wrote ``output`` and when, with the versions of the
    software that wrote it (which may differ from the analysis's).
    """
    prov = store_provenance(store)
    prov["store"] = str(Path(store.path).absolute())
    prov["export"] = {"output": str(Path(output).absolute()), "invocation": invocation(call),
                      "created_utc": utc_now(), "software": versions()}
    return prov
