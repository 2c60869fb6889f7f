"""One tensor to compress, described by where its bytes are: what a worker process runs.

A :class:`TensorTask` names a tensor's shape, dtype and settings, and either the
file and offset of its bytes (mapped read-only in the worker) or, for a small
tensor, its values. :func:`run_task` compresses it with
:func:`onnx_dc.codec.tensor.encode_tensor`; a ``MemoryError`` becomes a one-line
:class:`~onnx_dc.errors.ResourceError` saying which tensor, how much memory it
takes and what needs less. This module imports numpy and the codec only, so a
worker process starts light (``onnx_dc.api.parallel`` runs the workers).
"""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass

import numpy as np

from onnx_dc.codec.tensor import EncodedTensor, TensorSettings, encode_memory_bytes, encode_tensor
from onnx_dc.errors import OnnxDcError, out_of_memory

__all__ = ["TensorTask", "run_task", "worker_init", "worker_run"]


@dataclass(frozen=True)
class TensorTask:
    """One tensor to compress: its bytes' location (or, when small, its values) and its settings."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    settings: TensorSettings
    path: str | None = None
    offset: int = 0
    values: np.ndarray | None = None

    @property
    def n_weights(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Size of the dense tensor."""
        return self.n_weights * np.dtype(self.dtype).itemsize

    def array(self) -> np.ndarray:
        """The tensor's values: a read-only memory map of its bytes, or the values given."""
        if self.values is not None:
            return self.values
        assert self.path is not None
        if self.n_weights == 0:
            return np.zeros(self.shape, dtype=self.dtype)
        return np.memmap(self.path, dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r", offset=self.offset,
                         shape=self.shape)


def run_task(task: TensorTask, jobs: int = 1) -> EncodedTensor:
    """Compress one task (in a worker or in this process); memory errors become one-line ResourceErrors."""
    try:
        values = task.array()
        try:
            return encode_tensor(values, task.settings)
        finally:
            del values
    except (MemoryError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno != errno.ENOMEM:  # mapping the tensor's file failed otherwise
            raise OnnxDcError(f"tensor {task.name!r}: cannot read {task.path}: {exc.strerror or exc}") from None
        need = encode_memory_bytes(task.n_weights, np.dtype(task.dtype).itemsize)
        fewer = "--jobs 1" if jobs <= 3 else f"--jobs {jobs // 2} or --jobs 1"
        hint = (f"compressing it takes about {need / 2**20:,.0f} MiB"
                + (f" per worker; {fewer} needs less" if jobs > 1 else "; free memory or raise the memory limit"))
        shape = "x".join(map(str, task.shape)) or "scalar"
        raise out_of_memory(f"compressing tensor {task.name!r} ({shape} {task.dtype}, {task.nbytes / 2**20:,.0f} MiB)",
                            exc, hint=hint) from None
    except OnnxDcError as exc:
        raise type(exc)(f"tensor {task.name!r}: {exc}") from None


def worker_init() -> None:
    """Worker process start: ignore Ctrl-C (the parent stops the workers when it is interrupted)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_run(task: TensorTask, jobs: int) -> EncodedTensor:
    """What a worker process runs: :func:`run_task`."""
    return run_task(task, jobs)
