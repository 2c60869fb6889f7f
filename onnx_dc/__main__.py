"""``python -m onnx_dc``: the ``onnx-dc`` command line (the same entry point as the console script)."""

from __future__ import annotations

import sys

from onnx_dc.console import main

sys.exit(main())
