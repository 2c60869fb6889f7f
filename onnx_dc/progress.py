"""Progress on stderr, shared by every layer: a bar on a terminal, one line per stage elsewhere.

Functions that take ``progress`` accept ``False`` (nothing), a callable (called
by the function itself with what it reports) or ``True``: then this module
decides. When stderr is a terminal a tqdm bar counts the tensors (or layers,
samples); when it is not (a log file, a pipe, CI) one line ``onnx-dc: ...`` is
printed per stage instead, never one per tensor. Like :mod:`onnx_dc.errors`
it sits below the layers and imports nothing of onnx-dc.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["on_terminal", "progress_bar", "stage_line"]


def on_terminal() -> bool:
    """True when stderr is a terminal (progress bars), False for a file or a pipe (stage lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def stage_line(progress: Any, text: str) -> None:
    """With ``progress is True`` and stderr not a terminal, print ``onnx-dc: text`` (one stage) on stderr."""
    if progress is True and not on_terminal():
        print(f"onnx-dc: {text}", file=sys.stderr, flush=True)


def progress_bar(progress: Any, total: int | None, *, unit: str, description: str):
    """A tqdm bar on stderr when ``progress is True`` and stderr is a terminal, else None."""
    if progress is not True or not on_terminal():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=description, leave=False)
