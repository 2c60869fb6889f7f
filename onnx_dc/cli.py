"""The ``onnx-dc`` command line (also ``python -m onnx_dc``).

Subcommands::

    onnx-dc compress IN -o OUT [--sparsity S] [--quality Q] [--bits B] [--index-bits I]
                               [--init M] [--exclude GLOB] [--min-elements N] [--seed N] [--json]
    onnx-dc decompress IN -o OUT
    onnx-dc inspect MODEL [--json]
    onnx-dc validate ORIGINAL COMPRESSED [--inputs F.npz] [--json] [--max-abs-diff X] [--min-cosine Y]
                                         [--library | --no-library]

Exit codes: 0 success; 1 ``validate`` ran but a threshold was violated;
2 a user mistake (missing file, not ONNX, bad setting...), reported as one
line on stderr; 130 interrupted (no partial output is left behind).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from onnx_dc import __version__
from onnx_dc.errors import OnnxDcError

EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_SETTING_HELP = (
    "one value for every tensor, or KEY=VALUE,... where KEY is a kind (fc, conv, other), "
    "a tensor name or a glob; the most specific match wins"
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one line (exit code 2) instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``onnx-dc``."""
    parser = _Parser(prog="onnx-dc", description="Deep Compression for ONNX models.")
    parser.add_argument("--version", action="version", version=f"onnx-dc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("compress", help="compress a model's weights (prune, share, Huffman-code)")
    p.add_argument("input", metavar="IN", help="ONNX model to compress")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="compressed model to write")
    p.add_argument("--sparsity", metavar="S", help=f"fraction of weights pruned by magnitude, 0..1: {_SETTING_HELP}")
    p.add_argument("--quality", metavar="Q", help=f"prune |w| < Q * std(w) (the paper's rule) instead: {_SETTING_HELP}")
    p.add_argument("--bits", metavar="B", help=f"bits per shared weight, 1..8: {_SETTING_HELP}")
    p.add_argument("--index-bits", metavar="I", help=f"bits per relative index, 1..16: {_SETTING_HELP}")
    p.add_argument("--init", metavar="M", help=f"k-means initialisation (linear, density, random, kmeans++): {_SETTING_HELP}")
    p.add_argument("--exclude", metavar="GLOB", action="append", help="leave matching tensors dense (repeatable)")
    p.add_argument("--min-elements", metavar="N", help="leave tensors with fewer elements dense (default 256)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="random seed (random/kmeans++ init)")
    p.add_argument("--external-data", action="store_true", help="always write tensors to OUT.data beside the model")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("decompress", help="turn a compressed model back into standard ONNX")
    p.add_argument("input", metavar="IN", help="compressed ONNX model")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="standard ONNX model to write")
    p.add_argument("--external-data", action="store_true", help="always write tensors to OUT.data beside the model")

    p = sub.add_parser("inspect", help="per-layer table of a compressed model")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--json", action="store_true", help="machine-readable report")

    p = sub.add_parser("validate", help="compare a compressed model's outputs with the original's")
    p.add_argument("original", metavar="ORIGINAL")
    p.add_argument("compressed", metavar="COMPRESSED")
    p.add_argument("--inputs", metavar="FILE.npz", help="inputs keyed by input name (default: generated)")
    p.add_argument("--max-abs-diff", metavar="X", type=float, help="fail (exit 1) when an output differs by more")
    p.add_argument("--min-cosine", metavar="Y", type=float, help="fail (exit 1) when an output's cosine is lower")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--library", dest="library", action="store_true", default=None, help="require the custom operator library")
    group.add_argument("--no-library", dest="library", action="store_false", help="run the decompressed model instead")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by the console script)."""
    previous = _install_sigterm_handler()
    try:
        try:
            args = build_parser().parse_args(argv)
        except _UsageError as exc:
            _error(str(exc))
            return EXIT_USAGE
        if args.command is None:
            _error("missing command (compress, decompress, inspect or validate); see onnx-dc --help")
            return EXIT_USAGE
        output = getattr(args, "output", None)
        before = _file_identity(output)
        try:
            return _COMMANDS[args.command](args)
        except KeyboardInterrupt:
            if output is not None and _file_identity(output) != before:
                _error(f"interrupted after {output} was written completely")
            else:
                _error("interrupted; no output was written")
            return EXIT_INTERRUPTED
    except OnnxDcError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted; no output was written")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _compress(args: argparse.Namespace) -> int:
    from onnx_dc.api import compress

    result = compress(
        args.input,
        args.output,
        sparsity=args.sparsity,
        quality=args.quality,
        bits=args.bits,
        index_bits=args.index_bits,
        init=args.init,
        exclude=args.exclude,
        min_elements=args.min_elements,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
        external_data=True if args.external_data else None,
    )
    if args.json:
        print(json.dumps(result.report.to_dict(), indent=2))
    else:
        print(result.report.format_table())
        print(f"wrote {args.output}")
    for warning in result.warnings:
        print(f"onnx-dc: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _decompress(args: argparse.Namespace) -> int:
    from onnx_dc.api import decompress

    decompress(args.input, args.output, external_data=True if args.external_data else None)
    print(f"wrote {args.output}")
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from onnx_dc.api import inspect

    report = inspect(args.model)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from onnx_dc.api import validate

    report = validate(
        args.original,
        args.compressed,
        args.inputs,
        max_abs_diff=args.max_abs_diff,
        min_cosine=args.min_cosine,
        use_library=args.library,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return EXIT_OK if report.passed else EXIT_THRESHOLD


_COMMANDS = {"compress": _compress, "decompress": _decompress, "inspect": _inspect, "validate": _validate}


def _error(message: str) -> None:
    text = " ".join(message.split())  # one line, whatever the message contained
    print(f"onnx-dc: error: {text}", file=sys.stderr)


def _file_identity(path: str | None) -> tuple[int, int, int] | None:
    """(device, inode, mtime) of a file, None when absent: an atomic rename changes the inode."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _install_sigterm_handler():
    """Turn SIGTERM into KeyboardInterrupt so temporary files are removed on the way out."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        return None


if __name__ == "__main__":
    sys.exit(main())
