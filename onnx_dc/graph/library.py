"""Where the C++ custom operator library (runtime/) is.

The library is built by ``pip install`` (setup.py runs CMake) and installed
inside this package as ``libonnx_dc_ops.so``. Register it with onnxruntime::

    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(onnx_dc.ops_library_path())
"""

from __future__ import annotations

import os
from pathlib import Path

from onnx_dc.errors import LibraryNotFoundError

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
