"""Progress on stderr, shared by every layer: a bar on a terminal, one line per stage elsewhere.

Functions that take ``progress`` accept ``False`` (nothing), a callable (called
by the function itself with what it reports) or ``True``: then this module
decides. When stderr is a terminal a tqdm bar counts the tensors (or weights,
layers, samples, bytes) with its rate and the time left; when it is not (a log
file, a pipe, CI) one line ``onnx-dc: ...`` is printed per stage instead, never
one per tensor. :func:`running` names the step under way (reported or not), so
that an error such as running out of memory can say what was being done. Like
:mod:`onnx_dc.errors` it sits below the layers and imports nothing of onnx-dc.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["current_stage", "on_terminal", "progress_bar", "running", "stage_line"]


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


def progress_bar(progress: Any, total: int | None, *, unit: str, description: str, unit_scale: bool = False):
    """A tqdm bar on stderr when ``progress is True`` and stderr is a terminal, else None.

    ``unit_scale`` counts in k, M, G (weights, bytes); the bar shows the rate and the time left.
    """
    if progress is not True or not on_terminal():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=description, leave=False, unit_scale=unit_scale)


_RUNNING: list[str] = []  # the steps under way, outermost first
_LEFT: list[str] = []  # the innermost step an exception last left


@contextlib.contextmanager
def running(step: str) -> Iterator[None]:
    """Name the step under way for :func:`current_stage` (prints nothing)."""
    if not _RUNNING:
        _LEFT.clear()
    _RUNNING.append(step)
    try:
        yield
    except BaseException:
        if not _LEFT:
            _LEFT.append(step)
        raise
    finally:
        _RUNNING.pop()


def current_stage() -> str | None:
    """The innermost step under way, else the one an exception last left, for error messages."""
    return _RUNNING[-1] if _RUNNING else (_LEFT[-1] if _LEFT else None)
