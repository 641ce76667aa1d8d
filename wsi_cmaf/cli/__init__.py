"""Command-line entry point ``wsi-cmaf``.

Each verb lives in its own module of this package and exposes ``VERB``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; :func:`main` discovers them, so
adding a verb never touches this file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from types import ModuleType

from wsi_cmaf import __version__
from wsi_cmaf.config_dict import PRECISIONS
from wsi_cmaf.errors import (
    BackendUnavailableError,
    ConfigError,
    MissingResolutionError,
    NotASlideFileError,
    SlideNotFoundError,
    UsageError,
    WsiCmafError,
)
from wsi_cmaf.output.provenance import set_command_line

logger = logging.getLogger("wsi_cmaf")


def add_inference_options(p: argparse.ArgumentParser, *, reader_threads_default: int | None) -> None:
    """Options shared by ``analyze`` and ``batch``: precision, compile, reader threads, exports."""
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="autocast precision: auto = bf16/fp16 on CUDA, bf16 on CPUs with native bf16 "
                        "(AMX, AVX512-BF16) else fp32; off = fp32 everywhere")
    p.add_argument("--compile", default="auto",
                   choices=["auto", "off", "on", "default", "max-autotune", "reduce-overhead"],
                   help="torch.compile the model (auto: on CUDA only; the first batches compile)")
    p.add_argument("--reader-threads", type=int, default=reader_threads_default,
                   help="threads decoding blocks per slide" + (
                       f" (default {reader_threads_default})" if reader_threads_default else " (default: automatic)"))
    p.add_argument("--no-overlay", dest="overlay", action="store_false", help="do not draw the overlay PNG")
    p.add_argument("--no-geojson", dest="geojson", action="store_false", help="do not write the GeoJSON")


def require_path(path: str, what: str) -> None:
    """:class:`UsageError` when ``path`` (a command-line argument) does not exist."""
    from pathlib import Path

    if not Path(path).exists():
        raise UsageError(f"{path}: no such {what}; check the path")


def _verb_modules() -> list[ModuleType]:
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "VERB") and hasattr(module, "run"):
            modules.append(module)
    return modules


def add_global_flags(p: argparse.ArgumentParser, default: object = argparse.SUPPRESS) -> None:
    """-q/-v/--debug; verbs with sub-verbs add them to each sub-parser too.

    The same flags sit on the top-level parser and on every verb, so they work before or after
    the verb. On the verbs the default is SUPPRESS: an absent flag then leaves the value the
    top-level parser set instead of resetting it.
    """
    p.add_argument("--debug", action="store_true", default=default, help="show full tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="only warnings and errors: no progress bar, no summary")
    p.add_argument("-v", "--verbose", action="count", default=default, help="more log detail (debug logs of wsi-cmaf)")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per discovered verb."""
    parser = argparse.ArgumentParser(
        prog="wsi-cmaf",
        description="Whole-slide image analysis with CMAF-Net: tiling, inference, heatmaps, training. "
                    "Exit status: 0 success, 1 runtime error, 2 usage error (bad arguments or paths).",
    )
    parser.add_argument("--version", action="version", version=f"wsi-cmaf {__version__}")
    add_global_flags(parser, None)
    parser.set_defaults(debug=False, quiet=False, verbose=0)
    common = argparse.ArgumentParser(add_help=False)
    add_global_flags(common)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for module in _verb_modules():
        verb_parser = sub.add_parser(
            module.VERB, help=module.HELP, description=module.HELP, parents=[common]
        )
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


#: errors about the arguments themselves (exit status 2, like argparse's own usage errors);
#: every other WsiCmafError happened while working (exit status 1)
USAGE_ERRORS: tuple[type[Exception], ...] = (UsageError, ConfigError, SlideNotFoundError, NotASlideFileError,
                                             BackendUnavailableError)


def exit_code(exc: WsiCmafError) -> int:
    """2 for a usage error (bad argument, path or option value), 1 for a runtime error."""
    return 2 if isinstance(exc, USAGE_ERRORS) else 1


def error_text(exc: WsiCmafError, args: argparse.Namespace) -> str:
    """The one-line message for ``exc``: a slide without µm/px gets the advice of the verb that ran.

    A verb that opens slides names its way of giving the µm/px in ``MPP_HINT``; the library's
    advice (a Python keyword) would be wrong on the command line.
    """
    run = getattr(args, "_run", None)
    hint = getattr(sys.modules.get(getattr(run, "__module__", ""), None), "MPP_HINT", None)
    if isinstance(exc, MissingResolutionError) and hint:
        prefix = f"{exc.path}: " if exc.path is not None else ""
        return f"{prefix}{exc.reason}; {hint}"
    return str(exc)


def _quiet_distributed() -> None:
    """Keep dask.distributed's start-up and connection INFO lines out of the CLI's output.

    distributed sets its loggers' levels from dask's config when it is first imported (and
    hands that config to worker processes), so the root level alone does not silence it.
    Verbs that never use dask must not pay for importing it: until dask is imported, the same
    setting goes in through dask's environment variable, which dask reads when it is first
    imported (and worker processes inherit).
    """
    if "dask" not in sys.modules:
        os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
        return
    import dask

    dask.config.set({"logging.distributed": "warning"})
    logging.getLogger("distributed").setLevel(logging.WARNING)  # when already imported


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 1 runtime error, 2 usage error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with status 2 on a usage error
    args.verbose = args.verbose or 0
    level = logging.DEBUG if (args.debug or args.verbose) else (logging.WARNING if args.quiet else logging.INFO)
    # Our own loggers speak at INFO; third-party ones (distributed's per-worker chatter above
    # all) only at WARNING unless --debug asks for everything.
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("wsi_cmaf").setLevel(level)
    if not args.debug:
        _quiet_distributed()
    set_command_line(["wsi-cmaf", *argv])  # provenance of every output this run writes
    try:
        return int(args._run(args) or 0)
    except WsiCmafError as exc:
        if args.debug:
            raise
        print(f"wsi-cmaf {args.verb}: error: {error_text(exc, args)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print(f"wsi-cmaf {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        set_command_line(None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
