"""Progress of long steps on stderr: loading, compressing, calibration capture, writing.

A :class:`Progress` reports *stages*. Each stage counts items (tensors,
samples...) and optionally weights and bytes, and shows their rates and the
time left:

* on a terminal, one line redrawn in place at most every
  :data:`REDRAW_SECONDS`, e.g. ``compressing  5/17 tensors  412.3 M weights
  11.2 M weights/s  45.0 MB/s  0:58 left  layers.5.weight``, cleared when the
  stage ends;
* elsewhere (a log, a pipe), nothing while the stage runs and one summary line
  when it ends, only for stages that took at least :data:`LOG_MIN_SECONDS`
  (short runs stay silent), e.g. ``onnx-dc: compressing: 17 tensors,
  1.10 G weights in 98.1 s (11.2 M weights/s, 44.9 MB/s)``;
* disabled (``--no-progress``), nothing at all.

This module sits below the layers (like :mod:`onnx_dc.errors`) so that every
layer can report its stages.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["LOG_MIN_SECONDS", "NO_PROGRESS", "REDRAW_SECONDS", "Progress", "Stage", "as_progress", "current_stage"]

#: Seconds between redraws of the terminal line.
REDRAW_SECONDS = 0.25
#: Stages shorter than this print no summary line outside a terminal.
LOG_MIN_SECONDS = 10.0


class Progress:
    """Reports stages on ``stream`` (default stderr): live on a terminal, one line per long stage otherwise."""

    def __init__(self, enabled: bool = True, *, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self._live = live

    @property
    def live(self) -> bool:
        """Whether the stream is a terminal (lines are redrawn in place)."""
        if self._live is None:
            stream = self.stream or sys.stderr
            try:
                self._live = bool(stream.isatty())
            except (AttributeError, ValueError):
                self._live = False
        return self._live

    def stage(self, name: str, *, total: int | None = None, unit: str = "", total_weights: int | None = None,
              total_bytes: int | None = None) -> Stage:
        """A new stage: ``total`` items of ``unit`` (and optionally weights and bytes) to go."""
        return Stage(self, name, total, unit, total_weights, total_bytes)

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream is no reason to fail the work
            self.enabled = False


_CURRENT: list[str] = []  # stages running now, outermost first
_FAILED: list[str] = []  # the innermost stage an exception last left


def current_stage() -> str | None:
    """The innermost stage running now, else the one an exception last left (reported or not), for error messages."""
    return _CURRENT[-1] if _CURRENT else (_FAILED[-1] if _FAILED else None)


NO_PROGRESS = Progress(False)
"""A reporter that reports nothing."""


def as_progress(progress: object) -> Progress:
    """The reporter for an API ``progress`` argument: a :class:`Progress` as is, ``True`` one on stderr,
    anything else (``False``, a per-item callback) none."""
    if isinstance(progress, Progress):
        return progress
    return Progress(True) if progress is True else NO_PROGRESS


class Stage:
    """One stage of a :class:`Progress`; a context manager that prints its summary when it ends normally."""

    def __init__(self, progress: Progress, name: str, total: int | None, unit: str, total_weights: int | None,
                 total_bytes: int | None) -> None:
        self.progress = progress
        self.name = name
        self.total = total
        self.unit = unit
        self.total_weights = total_weights
        self.total_bytes = total_bytes
        self.done = 0
        self.weights = 0
        self.bytes = 0
        self.label = ""
        self.start = time.monotonic()
        self._drawn = 0.0
        self._line_width = 0

    def __enter__(self) -> Stage:
        if not _CURRENT:
            _FAILED.clear()
        _CURRENT.append(self.name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if _CURRENT and _CURRENT[-1] == self.name:
            _CURRENT.pop()
        if exc_type is not None and not _FAILED:
            _FAILED.append(self.name)
        self.finish(summary=exc_type is None)

    def advance(self, items: int = 1, *, weights: int = 0, nbytes: int = 0, label: str = "") -> None:
        """Count ``items`` more items (and their weights and bytes); ``label`` names the current one."""
        self.done += items
        self.weights += weights
        self.bytes += nbytes
        if label:
            self.label = label
        self._maybe_draw()

    def set_label(self, label: str) -> None:
        """Name what is being worked on now (shown on a terminal)."""
        self.label = label
        self._maybe_draw()

    def finish(self, *, summary: bool = True) -> None:
        """End the stage: clear the terminal line, print the summary line if it is due."""
        progress = self.progress
        if not progress.enabled:
            return
        elapsed = time.monotonic() - self.start
        if progress.live and self._line_width:
            progress._write("\r" + " " * self._line_width + "\r")
            self._line_width = 0
        if summary and (progress.live or elapsed >= LOG_MIN_SECONDS) and elapsed >= REDRAW_SECONDS:
            progress._write(f"onnx-dc: {self.summary(elapsed)}\n")

    def summary(self, elapsed: float) -> str:
        """``name: N units, W weights in T s (rates)``."""
        parts = [f"{self.done} {self.unit}".strip()]
        if self.weights:
            parts.append(f"{_count(self.weights)} weights")
        if self.bytes:
            parts.append(_size(self.bytes))
        rates = _rates(self.weights, self.bytes, self.done, self.unit, elapsed)
        return f"{self.name}: {', '.join(parts)} in {elapsed:.1f} s" + (f" ({rates})" if rates else "")

    def _maybe_draw(self) -> None:
        progress = self.progress
        if not (progress.enabled and progress.live):
            return
        now = time.monotonic()
        if now - self._drawn < REDRAW_SECONDS:
            return
        self._drawn = now
        elapsed = now - self.start
        fields = [self.name]
        if self.total is not None:
            fields.append(f"{self.done}/{self.total} {self.unit}".strip())
        elif self.done:
            fields.append(f"{self.done} {self.unit}".strip())
        if self.weights:
            fields.append(f"{_count(self.weights)} weights")
        rates = _rates(self.weights, self.bytes, self.done, self.unit, elapsed)
        if rates:
            fields.append(rates)
        left = self._seconds_left(elapsed)
        if left is not None:
            fields.append(f"{int(left) // 60}:{int(left) % 60:02d} left")
        if self.label:
            fields.append(self.label)
        line = "  ".join(fields)[:200]
        pad = max(0, self._line_width - len(line))
        progress._write("\r" + line + " " * pad)
        self._line_width = len(line)

    def _seconds_left(self, elapsed: float) -> float | None:
        """Time left from the fraction done (by weights, else bytes, else items)."""
        for done, total in ((self.weights, self.total_weights), (self.bytes, self.total_bytes), (self.done, self.total)):
            if total and done:
                return elapsed * (total - done) / done
        return None


def _rates(weights: int, nbytes: int, items: int, unit: str, elapsed: float) -> str:
    if elapsed <= 0:
        return ""
    rates = []
    if weights:
        rates.append(f"{_count(weights / elapsed)} weights/s")
    if nbytes:
        rates.append(f"{nbytes / elapsed / 1e6:.1f} MB/s")
    if not rates and items and unit:
        rates.append(f"{items / elapsed:.1f} {unit}/s")
    return ", ".join(rates)


def _count(n: float) -> str:
    for value, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= value:
            return f"{n / value:.2f}{suffix}".replace(".00 ", " ")
    return f"{n:.0f}"


def _size(n: int) -> str:
    for value, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= value:
            return f"{n / value:.1f} {suffix}"
    return f"{n} B"
