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
    """The slide carries no µm/px and no ``mpp=`` override was given.

    ``reason`` says what was looked for; ``advice`` how to give the value (the Python call by
    default; the command line replaces it with the option of the verb that ran).
    """

    def __init__(self, path: str | Path | None, reason: str,
                 advice: str = "pass the scanner's value with the mpp= override (e.g. open_slide(path, mpp=0.25))",
                 ) -> None:
        self.reason, self.advice = reason, advice
        super().__init__(path, f"{reason}; {advice}")


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


class StoreFormatError(StoreMismatchError):
    """An existing store was written in another store format version than this wsi-cmaf reads."""


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


# --- fault tolerance / implausible numbers ---------------------------------------------
class ImplausibleValueError(ConfigError, ValueError):
    """A user number is outside the range wsi-cmaf can use (or would allocate memory in
    proportion to it). The message says what was given and what is expected."""


class ImplausibleResolutionError(ImplausibleValueError):
    """An ``mpp=`` override lies outside the plausible range of µm/px (0.05-100)."""


class RequestTooLargeError(ImplausibleValueError):
    """A region, thumbnail or tile grid would be too large to hold in memory."""


class NoDecodableTissueError(UnreadableSlideError):
    """Every tile of the level the tissue stage reads failed to decode: nothing to analyse."""


# --- command-line usage (exit code 2 = usage, 1 = runtime) --------------------------------
class UsageError(WsiCmafError):
    """An argument cannot be used as given (checked before any model load or output)."""


class DeviceUnavailableError(UsageError, ConfigError):
    """The requested compute device (e.g. ``cuda``) does not exist on this machine."""


class OutputNotADirectoryError(UsageError, OutputError):
    """An output folder was asked for where a file (not a folder) already exists."""


class MissingDependencyError(WsiCmafError, ImportError):
    """An optional package needed for the requested output is not installed."""


class CudaGraphThreadError(ConfigError):
    """CUDA graphs (``compile='reduce-overhead'``) were asked for from a second thread of one
    process, as when slides share a worker; graph trees keep per-thread state."""


class ImageGeometryError(DataError):
    """A training or evaluation image does not fit the geometry asked for (e.g. an image larger
    than the model's tile where tiles were expected; it would otherwise be cropped)."""


# --- slide quality control -------------------------------------------------------------
class MppEstimateError(WsiCmafError):
    """The µm/px could not be estimated from the image (too little tissue or too few nuclei)."""


# --- hostile environments: broken models, damaged stores, full or read-only disks -------
class NonFiniteOutputError(ModelError):
    """A model returned NaN or Inf for more tiles (or samples) than can be ignored: its output
    would look like a benign result. The message names the model and what to try."""


class ImplausibleModelConfigError(ModelConfigError, ImplausibleValueError):
    """A model config asks for sizes or spacings outside the range any real model uses (a
    multi-gigabyte input per tile, a patch wider than a slide, a non-positive µm/px)."""


class StoreDamagedError(OutputError):
    """A heatmap store's blocks do not match what was recorded when they were written."""


class StoreLockedError(OutputError):
    """Another process holds the writer lock of a heatmap store. ``holder`` is its lock record."""

    def __init__(self, message: str, holder: dict | None = None) -> None:
        self.holder = dict(holder or {})
        super().__init__(message)


class OutputWriteError(OutputError):
    """Writing an output failed (disk full, read-only, no permission, quota). ``path`` is the file
    or folder, ``errno`` the OS error number; the message says what was kept and what to do."""

    def __init__(self, path: str | Path, errno: int | None, message: str) -> None:
        self.path = Path(path)
        self.errno = errno
        super().__init__(message)


class InsufficientSpaceError(OutputWriteError):
    """The output file system has clearly less free space than the run needs (checked before
    inference). ``need`` and ``free`` are in bytes."""

    def __init__(self, path: str | Path, need: int, free: int, message: str) -> None:
        import errno as _errno

        self.need, self.free = int(need), int(free)
        super().__init__(path, _errno.ENOSPC, message)


class EncoderError(ModelError):
    """A foundation-model tile encoder could not be used (unknown name, weights, checkpoint)."""


class UnknownEncoderError(EncoderError, UsageError):
    """An encoder name that is neither registered nor ``timm:<architecture>``."""


class EncoderWeightsNotFoundError(EncoderError):
    """No local weights were found for an encoder and downloading was not allowed."""


class CheckpointKeyError(EncoderError):
    """A checkpoint lacks keys the encoder needs or holds keys it does not have.
    ``missing`` and ``unexpected`` list them."""

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None) -> None:
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        super().__init__(message)


class CheckpointShapeError(EncoderError):
    """A checkpoint tensor has another shape than the encoder's (``wrong``: {key: (got, want)})."""

    def __init__(self, message: str, wrong: dict | None = None) -> None:
        self.wrong = dict(wrong or {})
        super().__init__(message)


class EncoderDimensionError(EncoderError):
    """An encoder's embedding has another width than its registry entry declares."""
