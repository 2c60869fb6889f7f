"""Exception types raised by onnx-dc.

Every error that is the user's (bad file, bad setting, corrupted container)
derives from :class:`OnnxDcError`; the command line turns it into one line on
stderr and exit code 2. Anything else escaping is a bug.
"""

from __future__ import annotations


class OnnxDcError(Exception):
    """Base class of all errors onnx-dc reports to its user."""


class ContainerError(OnnxDcError, ValueError):
    """A container byte string is truncated, corrupted, oversized or of an unsupported version."""


class InvalidTensorError(OnnxDcError, ValueError):
    """A tensor cannot be compressed (NaN or Inf values, unsupported dtype)."""


class SettingsError(OnnxDcError, ValueError):
    """A compression setting is unknown, out of range, or matches nothing."""


class ModelError(OnnxDcError):
    """A model file is missing, unreadable, not ONNX, or cannot be processed."""


class CalibrationError(OnnxDcError, ValueError):
    """Calibration or evaluation data does not fit the model."""


class LibraryNotFoundError(OnnxDcError, FileNotFoundError):
    """The custom operator library was not built or cannot be found."""


class ResourceError(OnnxDcError):
    """Memory ran out (or a worker process died): the message says what was being done and what needs less."""


def out_of_memory(what: str, exc: BaseException | None = None, *, hint: str = "") -> ResourceError:
    """A :class:`ResourceError` for a ``MemoryError`` (numpy's says how much it could not allocate)."""
    needed = getattr(exc, "_total_size", None) if exc is not None else None
    detail = f"could not allocate {needed / 2**20:,.0f} MiB" if isinstance(needed, int) else "memory ran out"
    return ResourceError(f"out of memory {what}: {detail}" + (f"; {hint}" if hint else ""))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message with its spaces collapsed (the type's name when empty),
    for one-line error reports that wrap errors of onnx, onnxruntime or numpy."""
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def caused_by_interrupt(exc: BaseException) -> bool:
    """True when ``exc`` is, or was raised while handling, a ``KeyboardInterrupt``: a signal that landed
    inside an extension module (an import, a C call) can surface as another exception."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
