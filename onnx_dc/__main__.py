"""``python -m onnx_dc``: the ``onnx-dc`` command line."""

from __future__ import annotations

import signal
import sys


def _interrupted(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


# Treat SIGTERM like Ctrl-C from the very start, so an interrupt while the
# package is still importing also ends with one line and no output.
signal.signal(signal.SIGTERM, _interrupted)
try:
    from onnx_dc.api.cli import main
except KeyboardInterrupt:
    print("onnx-dc: error: interrupted; no output was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
