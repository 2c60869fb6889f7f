"""A model whose weights stay in their files, written where onnxruntime can load it without copying them.

onnxruntime reads external data only from inside the directory of the model
file (it refuses paths that leave it, symbolic links included), and maps such
data into memory instead of reading it when the session does not prepack the
weights. :func:`write_linked_copy` writes the graph of a model from
:func:`onnx_dc.graph.tensor_store.open_model` (``anchored=True``) into a
directory of its own, with a hard link to every data file its references
point into (a copy where the file system refuses the link), and every other
large tensor written out once. A session on it holds the graph and whatever
pages of the weights a run touches (file pages the kernel can drop), not a
second copy of the model: the calibrated path runs multi-gigabyte models so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

from onnx_dc.graph.tensor_store import (
    MIN_REFERENCE_BYTES,
    anchor_of,
    copy_without_data,
    external_location,
    set_location,
    tensor_bytes_of,
)

__all__ = ["write_linked_copy"]


def write_linked_copy(model: onnx.ModelProto, directory: str | os.PathLike) -> Path:
    """Write ``model`` as ``directory/model.onnx`` with its large tensors as external data beside it.

    Anchored references are linked (or copied) from their files; large inline tensors are
    written to ``directory/inline.data``. Returns the model file's path. ``directory`` must exist
    and be empty; the caller removes it.
    """
    directory = Path(directory)
    copy, pairs = copy_without_data(model, MIN_REFERENCE_BYTES)
    linked: dict[Path, str] = {}
    inline_path = directory / "inline.data"
    with open(inline_path, "wb") as inline:
        for original, tensor in pairs:
            anchor = anchor_of(original) if original.data_location == onnx.TensorProto.EXTERNAL else None
            if anchor is not None:
                location = external_location(original, anchor)
                name = linked.get(location.path)
                if name is None:
                    name = linked[location.path] = f"linked-{len(linked)}.data"
                    _link_or_copy(location.path, directory / name)
                set_location(tensor, name, location.offset, location.length)
            else:
                data = tensor_bytes_of(original, None)
                offset = inline.tell()
                inline.write(data)
                set_location(tensor, inline_path.name, offset, len(data))
    path = directory / "model.onnx"
    with open(path, "wb") as f:
        f.write(copy.SerializeToString())
    return path


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
