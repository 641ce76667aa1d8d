"""Command-line entry point ``wsi-cmaf``.

Each verb lives in its own module of this package and exposes ``VERB``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; :func:`main` discovers them, so
adding a verb never touches this file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType

from wsi_cmaf import __version__
from wsi_cmaf.errors import WsiCmafError

logger = logging.getLogger("wsi_cmaf")


def add_inference_options(p: argparse.ArgumentParser, *, reader_threads_default: int | None) -> None:
    """Options shared by ``analyze`` and ``batch``: precision, compile, reader threads, exports."""
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="autocast: auto = bf16/fp16 on CUDA, fp32 on CPU; off = fp32 everywhere")
    p.add_argument("--compile", default="auto",
                   choices=["auto", "off", "on", "default", "max-autotune", "reduce-overhead"],
                   help="torch.compile the model (auto: on CUDA only; the first batches compile)")
    p.add_argument("--reader-threads", type=int, default=reader_threads_default,
                   help="threads decoding blocks per slide" + (
                       f" (default {reader_threads_default})" if reader_threads_default else " (default: automatic)"))
    p.add_argument("--no-overlay", dest="overlay", action="store_false", help="do not draw the overlay PNG")
    p.add_argument("--no-geojson", dest="geojson", action="store_false", help="do not write the GeoJSON")


def _verb_modules() -> list[ModuleType]:
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "VERB") and hasattr(module, "run"):
            modules.append(module)
    return modules


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per discovered verb."""
    parser = argparse.ArgumentParser(
        prog="wsi-cmaf",
        description="Whole-slide image analysis with CMAF-Net: tiling, inference, heatmaps, training.",
    )
    parser.add_argument("--version", action="version", version=f"wsi-cmaf {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for module in _verb_modules():
        verb_parser = sub.add_parser(
            module.VERB, help=module.HELP, description=module.HELP, parents=[common]
        )
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


def _quiet_distributed() -> None:
    """Keep dask.distributed's start-up and connection INFO lines out of the CLI's output.

    distributed sets its loggers' levels from dask's config when it is first imported (and
    hands that config to worker processes), so the root level alone does not silence it.
    """
    import dask

    dask.config.set({"logging.distributed": "warning"})
    logging.getLogger("distributed").setLevel(logging.WARNING)  # when already imported


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    # Our own loggers speak at INFO; third-party ones (distributed's per-worker chatter above
    # all) only at WARNING unless --debug asks for everything.
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("wsi_cmaf").setLevel(level)
    if not args.debug:
        _quiet_distributed()
    try:
        return int(args._run(args) or 0)
    except WsiCmafError as exc:
        if args.debug:
            raise
        print(f"wsi-cmaf {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wsi-cmaf {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
