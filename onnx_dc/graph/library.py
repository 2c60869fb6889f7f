"""Where the C++ custom operator library (runtime/) is, and onnxruntime sessions that use it.

The library is built by ``pip install`` (setup.py runs CMake) and installed
inside this package as ``libonnx_dc_ops.so``. Run a compressed model with::

    session = onnx_dc.inference_session("model.dc.onnx")

or register the library yourself::

    options = onnx_dc.session_options()   # = SessionOptions() + register_custom_ops_library(ops_library_path())
    session = onnxruntime.InferenceSession("model.dc.onnx", options, providers=["CPUExecutionProvider"])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnx_dc.errors import LibraryNotFoundError, ModelError, first_line

if TYPE_CHECKING:
    import onnx
    import onnxruntime

#: File name of the operator library inside the package directory.
LIBRARY_FILE = "libonnx_dc_ops.so"
#: Environment variable that points at a library to use instead (e.g. a sanitizer build).
LIBRARY_ENV_VAR = "ONNX_DC_OPS_LIBRARY"


def ops_library_path() -> str:
    """Return the path of the onnx-dc custom operator library for onnxruntime.

    ``$ONNX_DC_OPS_LIBRARY``, when set, names the library to use; otherwise it is
    ``libonnx_dc_ops.so`` in the ``onnx_dc`` package directory.

    Raises:
        LibraryNotFoundError: the library was not built (or the variable names a
            missing file); the message says how to build it.
    """
    override = os.environ.get(LIBRARY_ENV_VAR)
    if override:
        path = Path(override)
        if not path.is_file():
            raise LibraryNotFoundError(
                f"{LIBRARY_ENV_VAR}={override} does not name a file: unset it or point it at a built {LIBRARY_FILE}"
            )
        return str(path.resolve())
    path = Path(__file__).resolve().parent.parent / LIBRARY_FILE  # installed in the onnx_dc package directory
    if not path.is_file():
        raise LibraryNotFoundError(
            f"the onnx-dc operator library {path} is not built: reinstall the package "
            "(pip install . or pip install -e .) with cmake and a C++17 compiler present "
            "(Debian: apt-get install cmake g++) and read the build warning if it still fails; "
            "see docs/OPERATORS.md"
        )
    return str(path)


def session_options(options: onnxruntime.SessionOptions | None = None) -> onnxruntime.SessionOptions:
    """onnxruntime ``SessionOptions`` with the onnx-dc operator library registered.

    Args:
        options: options to register the library with (modified and returned); default new ones.

    Raises:
        LibraryNotFoundError: the library was not built (see :func:`ops_library_path`).
    """
    import onnxruntime

    path = ops_library_path()
    if options is None:
        options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(path)
    return options


def inference_session(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    options: onnxruntime.SessionOptions | None = None,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    **kwargs: Any,
) -> onnxruntime.InferenceSession:
    """A ready onnxruntime ``InferenceSession`` for a compressed model (any model works too).

    Args:
        model: a path (external data is read from beside it), the serialized bytes or an
            ``onnx.ModelProto`` (over 2 GB: pass its path).
        options: ``SessionOptions`` to use; the operator library is registered with them
            (:func:`session_options`).
        providers: execution providers; the ``ai.onnx_dc`` operators run on the CPU provider.
        kwargs: passed on to ``onnxruntime.InferenceSession``.

    Raises:
        LibraryNotFoundError: the operator library was not built.
        ModelError: the file is missing, or onnxruntime cannot load the model (its first line).
    """
    import onnxruntime

    options = session_options(options)
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise ModelError(f"{model}: no such file")
        source: str | bytes = str(model)
    elif isinstance(model, bytes):
        source = model
    else:
        source = model.SerializeToString()
    try:
        return onnxruntime.InferenceSession(source, options, providers=list(providers), **kwargs)
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc
