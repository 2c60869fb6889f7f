"""The ``onnx-dc`` console script and ``python -m onnx_dc``: signal handling first, then the command line.

This module imports nothing heavy. :func:`main` turns SIGINT and SIGTERM into
``KeyboardInterrupt`` before anything else happens, then imports the command
line (:mod:`onnx_dc.api.cli`, which loads numpy, onnx and onnxruntime only for
the commands that need them), so that an interrupt at any moment, even while
the imports are still running, ends with one line on stderr, exit code 130 and
no partial output.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from onnx_dc.errors import caused_by_interrupt

EXIT_INTERRUPTED = 130
INTERRUPTED_MESSAGE = "onnx-dc: error: interrupted; no output was written"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """Make SIGINT and SIGTERM raise ``KeyboardInterrupt``; a signal the parent ignores stays ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. a shell's background job ignores SIGINT
                signal.signal(signum, _raise_interrupt)
        except ValueError:  # not the main thread: leave the handlers alone
            return


def main(argv: Sequence[str] | None = None) -> int:
    """Install the signal handlers, import the command line and run it; returns the exit code."""
    install_signal_handlers()
    try:
        from onnx_dc.api.cli import main as cli_main
    except KeyboardInterrupt:
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        # A signal inside an extension module's initialisation can surface as another
        # exception (SystemError, ImportError) whose context is the KeyboardInterrupt.
        if caused_by_interrupt(exc):
            print(INTERRUPTED_MESSAGE, file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
