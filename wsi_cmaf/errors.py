"""Named exceptions raised by wsi-cmaf.

Every error a user can trigger with bad input derives from :class:`WsiCmafError`
and carries a message that names what was wrong (usually the path) and what to
do about it. The CLI prints ``str(error)`` as one line and exits non-zero.
"""

from __future__ import annotations

from pathlib import Path


class WsiCmafError(Exception):
    """Base class of every error wsi-cmaf raises on purpose."""


# --- slides -----------------------------------------------------------------
class SlideError(WsiCmafError):
    """A slide could not be used. ``path`` names the file."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = None if path is None else Path(path)
        prefix = f"{self.path}: " if self.path is not None else ""
        super().__init__(prefix + message)


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The path does not exist."""


class NotASlideFileError(SlideError):
    """The path exists but is not a regular, non-empty file (a directory, empty file...)."""


class UnreadableSlideError(SlideError):
    """No backend could open the file, or a read inside it failed (corrupt/truncated data)."""


class UnsupportedSlideError(SlideError):
    """The file opens but holds pixels we cannot analyse (e.g. 16-bit greyscale)."""


class MissingResolutionError(SlideError):
    """The slide carries no µm/px and no ``mpp=`` override was given."""


class BackendUnavailableError(WsiCmafError):
    """An explicitly requested reader backend is not installed."""


# --- models -----------------------------------------------------------------
class ModelError(WsiCmafError):
    """A model, its weights or its config could not be used."""


class ModelConfigError(ModelError):
    """A model config is missing fields, has wrong values, or does not match its weights."""


# --- outputs ----------------------------------------------------------------
class OutputError(WsiCmafError):
    """An output location cannot be written as asked."""


class OutputExistsError(OutputError):
    """A result already exists where we would write and ``overwrite`` was not given."""


class StoreMismatchError(OutputError):
    """An existing store was made by another model, config or slide; refusing to mix."""


# --- data / training ----------------------------------------------------------
class DataError(WsiCmafError):
    """Training or evaluation data is invalid. ``problems`` lists every offending row."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            shown = "\n".join(f"  - {p}" for p in self.problems[:50])
            more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
            message = f"{message} ({len(self.problems)} problem(s)):\n{shown}{more}"
        super().__init__(message)


class ManifestError(DataError):
    """A manifest file has bad rows (missing images, bad labels, leaking patients...)."""


class ConfigError(WsiCmafError):
    """A configuration file or value is invalid."""


class StainFitError(DataError):
    """A Macenko stain matrix could not be fitted (too few tissue pixels, degenerate colours)."""


# --- fault tolerance / implausible numbers (issue 13) -------------------------------------
class ImplausibleValueError(ConfigError, ValueError):
    """A user number is outside the range wsi-cmaf can use (or would allocate memory in
    proportion to it). The message says what was given and what is expected."""


class ImplausibleResolutionError(ImplausibleValueError):
    """An ``mpp=`` override lies outside the plausible range of µm/px (0.05-100)."""


class RequestTooLargeError(ImplausibleValueError):
    """A region, thumbnail or tile grid would be too large to hold in memory."""


class NoDecodableTissueError(UnreadableSlideError):
    """Every tile of the level the tissue stage reads failed to decode: nothing to analyse."""


# --- command-line usage (issue 14: exit code 2 = usage, 1 = runtime) ---------------------
class UsageError(WsiCmafError):
    """An argument cannot be used as given (checked before any model load or output)."""


class DeviceUnavailableError(UsageError, ConfigError):
    """The requested compute device (e.g. ``cuda``) does not exist on this machine."""


class OutputNotADirectoryError(UsageError, OutputError):
    """An output folder was asked for where a file (not a folder) already exists."""


class MissingDependencyError(WsiCmafError, ImportError):
    """An optional package needed for the requested output is not installed."""
