"""Compressing tensors in worker processes, results in the order they were asked for.

The converter hands each planned tensor to :class:`TensorWorkers` as a
:class:`TensorTask`: *where* its bytes are (a file, an offset, a length: the
model's external data, the ``.onnx`` file itself, or a spill file for a tensor
that only exists in memory) and its settings, never the values themselves, so
nothing large is pickled. A worker maps the bytes read-only
(``numpy.memmap``), runs :func:`onnx_dc.codec.tensor.encode_tensor` and sends
back the container (the output, a fraction of the tensor).

* ``jobs=1`` runs every task in this process, in order; ``jobs > 1`` starts that
  many worker processes (``forkserver`` where available, else ``spawn``: no
  copy of the parent's memory) and keeps at most ``jobs + 1`` tasks in flight,
  so finished containers wait for at most a few slower ones.
* Every task is deterministic and the results are put back in task order, so
  the output does not depend on ``jobs`` (``tests/test_scale.py`` checks it
  byte for byte).
* A ``MemoryError`` in a worker comes back as a
  :class:`~onnx_dc.errors.ResourceError` naming the tensor and how much memory
  compressing it takes; a worker killed from outside (the kernel's out-of-memory
  killer) ends the run with one too. Workers ignore Ctrl-C: the parent stops
  them when it is interrupted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_dc.codec.tensor import EncodedTensor, TensorSettings
from onnx_dc.codec.tensor_task import TensorTask, run_task, worker_init, worker_run
from onnx_dc.errors import InvalidTensorError, ResourceError, SettingsError, out_of_memory
from onnx_dc.graph.tensor_store import external_location, tensor_values

if TYPE_CHECKING:
    from onnx_dc.graph.settings import TensorPlan

__all__ = ["TensorTask", "TensorWorkers", "available_cores", "compress_plans", "default_jobs"]

# Tensors held only in memory and larger than this are written to a spill file for the workers.
_PICKLE_MAX_BYTES = 4 << 20


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_jobs() -> int:
    """The default number of worker processes: every available core."""
    return available_cores()


def check_jobs(jobs: object) -> int:
    """``jobs`` if it is an integer >= 1; raises :class:`SettingsError` otherwise."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SettingsError(f"jobs must be an integer >= 1, got {jobs!r}")
    return jobs


def compress_plans(
    todo: list[TensorPlan],
    source_dir: str | os.PathLike | None,
    compressor: Callable | None,
    jobs: int | None,
    on_wait: Callable[[int, TensorPlan], None] | None = None,
) -> Iterator[tuple[TensorPlan, object]]:
    """Each planned weight with its compressed tensor, in plan order.

    The default compressor runs on ``min(jobs, tensors)`` processes (``jobs`` default:
    every core). A custom ``compressor(weight, values, settings)`` (the calibrated
    path's) runs in this process, one tensor at a time. ``on_wait(i, plan)`` is
    called before the i-th result is awaited. Weights referring to external data
    are found relative to ``source_dir``.
    """
    jobs = default_jobs() if jobs is None else check_jobs(jobs)
    if compressor is not None:
        for index, plan in enumerate(todo):
            if on_wait is not None:
                on_wait(index, plan)
            weight = plan.weight
            try:
                values = tensor_values(weight.tensor, source_dir)
                yield plan, compressor(weight, values, plan.settings)
            except InvalidTensorError as exc:
                raise InvalidTensorError(f"tensor {weight.name!r}: {exc}") from None
            except MemoryError as exc:
                raise out_of_memory(f"compressing tensor {weight.name!r} ({weight.size_bytes / 2**20:,.0f} MiB)", exc,
                                    hint="free memory or raise the memory limit") from None
        return
    plans = {}
    with TensorWorkers(min(jobs, max(1, len(todo)))) as workers:

        def tasks() -> Iterator[TensorTask]:
            for plan in todo:
                weight = plan.weight
                if weight.tensor.data_location == onnx.TensorProto.EXTERNAL:
                    location = external_location(weight.tensor, source_dir)
                    source = (location.path, location.offset)
                else:
                    source = tensor_values(weight.tensor, None)
                task = workers.task(weight.name, source, plan.settings.to_tensor_settings(), shape=weight.shape,
                                    dtype=weight.dtype)
                plans[id(task)] = plan
                yield task

        wait = None if on_wait is None else (lambda index, task: on_wait(index, plans[id(task)]))
        for task, result in workers.run(tasks(), wait):
            yield plans.pop(id(task)), result


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the block: they interrupt when it ends.

    Starting a worker process must not be cut short: an interrupt between the child's
    creation and its registration in the pool would leave a child behind that finds
    the pool's queues gone (and says so on stderr). Signal masks cannot do this (any
    thread, e.g. a BLAS thread, may take the signal), so the handlers are swapped.
    """
    caught: list[int] = []

    def hold(signum, frame):  # noqa: ARG001
        caught.append(signum)

    try:
        previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):  # now as it would have been handled
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start worker processes without re-running the caller's script in them.

    ``spawn`` and ``forkserver`` children import the parent's ``__main__`` (and run a
    script's top level again unless it is guarded by ``if __name__ == "__main__"``).
    The workers need only :mod:`onnx_dc.codec.tensor_task`, so the main module's
    name and path are hidden while they start, as for an interactive session.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        if "__file__" in saved:
            del main.__file__
        main.__spec__ = None
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
        if "__spec__" not in saved:
            with contextlib.suppress(AttributeError):
                del main.__spec__


def _close_result_writer(executor: ProcessPoolExecutor) -> None:
    """Close this process's copy of the write end of ``executor``'s result pipe (every worker stopped).

    A worker terminated while it was sending a result leaves a partial message in the pipe, and the
    pool's manager thread then waits for the rest forever (``shutdown`` and interpreter exit with it:
    a SIGTERM at the wrong moment hung ``compress``). With no writer left the wait ends at end of
    file, and the pool shuts down as broken.
    """
    writer = getattr(getattr(executor, "_result_queue", None), "_writer", None)
    if writer is not None:
        with contextlib.suppress(OSError):
            writer.close()


class TensorWorkers:
    """Runs :class:`TensorTask` s on ``jobs`` processes (or inline for ``jobs=1``); a context manager."""

    def __init__(self, jobs: int) -> None:
        check_jobs(jobs)
        self.jobs = jobs
        self._executor: ProcessPoolExecutor | None = None
        self._spill: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> TensorWorkers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)

    def task(self, name: str, values_or_location, settings: TensorSettings, *, shape, dtype) -> TensorTask:
        """A task for a tensor given by its values (an array) or by ``(path, offset)`` of its bytes."""
        dtype = str(np.dtype(dtype))
        if isinstance(values_or_location, tuple):
            path, offset = values_or_location
            return TensorTask(name, tuple(shape), dtype, settings, path=str(path), offset=int(offset))
        values = np.asarray(values_or_location)
        if self.jobs == 1 or values.nbytes <= _PICKLE_MAX_BYTES:
            return TensorTask(name, tuple(shape), dtype, settings, values=values)
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="onnx-dc-spill-")
        path = Path(self._spill.name) / f"{len(os.listdir(self._spill.name))}.bin"
        np.ascontiguousarray(values).astype(np.dtype(dtype).newbyteorder("<"), copy=False).tofile(path)
        return TensorTask(name, tuple(shape), dtype, settings, path=str(path), offset=0)

    def run(
        self, tasks: Iterable[TensorTask], on_wait: Callable[[int, TensorTask], None] | None = None
    ) -> Iterator[tuple[TensorTask, EncodedTensor]]:
        """Each task with its result, in the order of ``tasks``; ``on_wait(i, task)`` before waiting for the i-th."""
        if self.jobs == 1:
            for index, task in enumerate(tasks):
                if on_wait is not None:
                    on_wait(index, task)
                yield task, run_task(task)
            return
        index = 0
        executor = self._start()
        pending: deque[tuple[TensorTask, Future]] = deque()
        iterator = iter(tasks)
        exhausted = False
        while True:
            while not exhausted and len(pending) <= self.jobs:
                task = next(iterator, None)
                if task is None:
                    exhausted = True
                    break
                with _signals_deferred(), _main_module_hidden():  # submit may start a worker process
                    future = executor.submit(worker_run, task, self.jobs)
                pending.append((task, future))
            if not pending:
                return
            task, future = pending.popleft()
            if on_wait is not None:
                on_wait(index, task)
            index += 1
            try:
                result = future.result()
            except BrokenProcessPool:
                raise ResourceError(
                    f"a worker process died while compressing tensor {task.name!r} "
                    f"({task.nbytes / 2**20:,.0f} MiB), probably killed by the system for lack of memory; "
                    f"--jobs 1 needs less"
                ) from None
            yield task, result

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if "forkserver" in methods:
                context.set_forkserver_preload(["onnx_dc.codec.tensor_task"])
            self._executor = ProcessPoolExecutor(max_workers=self.jobs, mp_context=context, initializer=worker_init)
        return self._executor

    def close(self, *, abort: bool = False) -> None:
        """Stop the workers (at once when ``abort``) and remove spill files."""
        executor, self._executor = self._executor, None
        if executor is not None:
            processes = list((getattr(executor, "_processes", None) or {}).values())
            if abort:
                for process in processes:
                    process.terminate()
                for process in processes:  # gone before the queues' semaphores are
                    process.join()
                _close_result_writer(executor)
            executor.shutdown(wait=True, cancel_futures=True)
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None
