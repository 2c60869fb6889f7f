"""Loading and saving ONNX models safely.

* :func:`load_model` reads a model file with its external data (models over
  2 GB keep their tensors in side files) or copies an in-memory
  ``onnx.ModelProto``, so the caller's model is never modified.
* :func:`save_model` writes a model atomically: every file goes to a temporary
  file in the target directory and is renamed into place only once it is
  complete, so an error, a full disk or an interrupt never leaves a partial
  output. Models whose protobuf would exceed the 2 GB limit are written with
  their large tensors in one external data file beside the model.
* :func:`constants_to_initializers` turns main-graph ``Constant`` weights (as
  PaddlePaddle exports them) into initializers, so stages that look at
  initializers (calibration) see them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from onnx_dc.errors import ModelError, first_line
from onnx_dc.graph.tensor_store import (
    all_tensors,
    check_model_file,
    copy_tensor_bytes,
    copy_without_data,
    encode_varint,
    external_location,
    has_references,
    iter_graphs,  # noqa: F401  (re-exported: onnx_dc.graph.model_io.iter_graphs)
    length_delimited,
    parse_model_bytes,
    read_structure,
    set_location,
    stored_bytes,
    tensor_array,
    tensor_nbytes,
)

ModelSource = str | os.PathLike | onnx.ModelProto

# A serialized protobuf message cannot exceed 2 GiB. Stay clear of it: the graph
# structure and small tensors still have to fit beside the inline tensors.
PROTOBUF_LIMIT_BYTES = 2**31 - 2**26

# Tensors at least this large go to the external data file when one is written.
EXTERNAL_DATA_MIN_BYTES = 1024

# Single files of at least this much tensor data are written a tensor at a time
# (the data of tensors of at least _STREAM_TENSOR_MIN_BYTES each straight to the file).
STREAM_MIN_BYTES = 64 << 20
_STREAM_TENSOR_MIN_BYTES = 64 << 10

# Offsets of large tensors in the external data file are aligned for mmap.
_EXTERNAL_ALIGN_BYTES = 4096
_EXTERNAL_ALIGN_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class SavedModel:
    """The files :func:`save_model` wrote."""

    model_path: Path
    external_data_path: Path | None

    @property
    def size_bytes(self) -> int:
        """Total size on disk of the model file and its external data file."""
        total = self.model_path.stat().st_size
        if self.external_data_path is not None:
            total += self.external_data_path.stat().st_size
        return total


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Load an ONNX model from a path (with its external data) or copy a ``ModelProto``.

    Raises :class:`ModelError` with one line naming the problem when the file
    is missing, unreadable, not an ONNX model, or its external data is missing.
    The returned model is always a new object: the caller's is never touched.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_is_model(model, "the given ModelProto")
        if has_references(model):
            raise ModelError(
                "the given ModelProto refers to external data that is not loaded; "
                "pass the model's file path instead"
            )
        return model
    if not isinstance(source, (str, os.PathLike)):
        raise ModelError(f"expected a model path or onnx.ModelProto, got {type(source).__name__}")
    path = check_model_file(source)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    model = parse_model_bytes(data, path)
    del data
    _check_is_model(model, str(path))
    if has_references(model):
        try:
            external_data_helper.load_external_data_for_model(model, str(path.resolve().parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelError(f"{path}: cannot load external data: {first_line(exc)}") from None
    return model


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes of an ONNX model file and of the external data files it refers to.

    Raises ``OSError`` or ``ValueError`` (an unreadable file) and :class:`ModelError` (not a model).
    """
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in external_data_files(path))


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """Resolved paths of the external data files an ONNX model file refers to (may be empty).

    The model is parsed without its tensors' data (:func:`onnx_dc.graph.tensor_store.read_structure`).
    """
    model_file = Path(path).resolve()
    model = read_structure(path)
    base = model_file.parent
    files: list[Path] = []
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    candidate = (base / entry.value).resolve()
                    if candidate not in files and candidate != model_file:
                        files.append(candidate)
    return files


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (also through symlinks and hard links)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def check_output_path(output: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> Path:
    """Refuse an output path that would overwrite an input model or its external data.

    Returns the output as a :class:`Path`. Raises :class:`ModelError`.
    """
    out = Path(output)
    if str(output) == "":
        raise ModelError("output path is empty")
    if out.is_dir():
        raise ModelError(f"{out}: output is a directory; give a file name")
    if not out.resolve().parent.is_dir():
        raise ModelError(f"{out}: output directory {out.resolve().parent} does not exist")
    data_path = out.with_name(out.name + ".data")
    for inp in inputs:
        if same_file(out, inp):
            raise ModelError(f"{out}: output is the same file as the input; choose another output path")
        protected = [Path(inp)]
        with contextlib.suppress(Exception):
            protected += external_data_files(inp)
        for p in protected:
            if same_file(data_path, p) or same_file(out, p):
                raise ModelError(
                    f"{out}: writing it would overwrite {p}, which belongs to the input model"
                )
    return out


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    source_dir: str | os.PathLike | None = None,
) -> SavedModel:
    """Write ``model`` to ``path`` atomically; never leaves a partial file behind.

    ``external_data``: ``None`` (default) writes one self-contained file unless
    the model is too large for protobuf's 2 GB limit, in which case tensors of at
    least :data:`EXTERNAL_DATA_MIN_BYTES` go to ``<path>.data`` beside it;
    ``True`` always writes the external data file; ``False`` never does (and
    fails for models over the limit). ``model`` is left as it was. A large model
    is written one tensor at a time from a copy of its graph without the data (the
    data file, or the single file's initializers after the rest of the graph),
    never as one more serialized copy in memory. Tensors that refer to external
    data (a model from :func:`onnx_dc.graph.tensor_store.open_model`) are copied
    from their files, found relative to ``source_dir``.
    Raises :class:`ModelError` when the file cannot be written.
    """
    path = Path(path)
    too_large = tensor_bytes(model) > PROTOBUF_LIMIT_BYTES
    if external_data is None:
        external_data = too_large
    elif not external_data and too_large:
        raise ModelError(f"{path}: model is over the 2 GB protobuf limit; it needs external data")
    if source_dir is None and has_references(model):
        raise ModelError(f"{path}: the model refers to external data, but not where it lies (source_dir)")
    directory = path.resolve().parent
    if not directory.is_dir():
        raise ModelError(f"{path}: directory {directory} does not exist")
    data_path = path.with_name(path.name + ".data") if external_data else None
    temps: list[Path] = []
    # Temporary files are removed in two nested finally clauses, both in place before any file
    # exists, so an interrupt arriving anywhere (even during one clean-up) leaves nothing behind.
    try:
        try:
            try:
                if data_path is None:
                    model_tmp = _temp_file(directory, path.name, temps)
                    if has_references(model) or tensor_bytes(model) >= STREAM_MIN_BYTES:
                        _write_streamed(model, model_tmp, source_dir)
                    else:
                        _write_bytes(model_tmp, _serialize(model, path))
                    os.replace(model_tmp, path)  # the commit point
                else:
                    _save_with_external_data(model, path, data_path, directory, temps, source_dir)
            except OSError as exc:
                raise ModelError(f"{path}: cannot write: {exc.strerror or exc}") from None
        finally:
            _remove_files(temps)
    finally:
        _remove_files(temps)
    return SavedModel(model_path=path, external_data_path=data_path)


def constants_to_initializers(model: onnx.ModelProto, names: Collection[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph ``Constant`` nodes holding a tensor became initializers.

    Exporters such as PaddlePaddle's keep every weight in a ``Constant`` node
    instead of an initializer. Each main-graph ``Constant`` node whose ``value``
    attribute is a tensor is removed and its tensor becomes an initializer named
    after the node's output, so every consumer reads the same values. With
    ``names``, only the Constants whose output is in ``names`` are converted.
    Everything else is unchanged (node order, other nodes, inputs, outputs,
    metadata); the caller's model is never modified. Not converted: Constants
    inside subgraphs (If/Loop/Scan bodies), Constants given by other attributes
    (``value_float``, ``sparse_value``, ...), Constants whose output is a graph
    output, and any Constant of a model with IR version < 4 (there an
    initializer must also be a graph input, which would change the interface).
    """
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    if converted.ir_version < 4:
        return converted
    graph = converted.graph
    graph_outputs = {output.name for output in graph.output}
    wanted = None if names is None else set(names)
    kept: list[onnx.NodeProto] = []
    tensors: list[onnx.TensorProto] = []
    for node in graph.node:
        tensor = _constant_tensor(node)
        output = node.output[0] if tensor is not None else ""
        if tensor is None or output in graph_outputs or (wanted is not None and output not in wanted):
            kept.append(node)
            continue
        tensor.name = output
        tensors.append(tensor)
    if not tensors:
        return converted
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(tensors)
    return converted


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A copy of the tensor of a ``Constant`` node given by its ``value`` attribute, else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1 or not node.output[0]:
        return None
    if len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.name != "value" or attribute.type != onnx.AttributeProto.TENSOR:
        return None
    tensor = onnx.TensorProto()
    tensor.CopyFrom(attribute.t)
    return tensor


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Approximate serialized size of every tensor in the model (initializers, Constant values)."""
    total = 0
    for tensor in all_tensors(model):
        total += _tensor_payload_bytes(tensor)
    return total


def serialized_size_bytes(model: onnx.ModelProto) -> int:
    """Size of the model's single-file serialization, computed without serializing it."""
    return model.ByteSize()


def attribute_subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The subgraphs a node attribute holds (If branches, Loop/Scan bodies): none, one or several."""
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not in ``taken`` first; it is added to ``taken``."""
    name, n = base, 1
    while name in taken:
        name = f"{base}_{n}"
        n += 1
    taken.add(name)
    return name


def _tensor_payload_bytes(tensor: onnx.TensorProto) -> int:
    return stored_bytes(tensor)


def _check_is_model(model: onnx.ModelProto, what: str) -> None:
    if not model.HasField("graph") or model.ir_version <= 0 or len(model.opset_import) == 0:
        raise ModelError(f"{what}: not an ONNX model (no graph, IR version or opset import)")




def _temp_file(directory: Path, name: str, temps: list[Path], *, create: bool = True) -> Path:
    """A new temporary file name in ``directory``, registered in ``temps`` before the file exists."""
    tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
    temps.append(tmp)
    if create:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # permissions as open() gives
        os.close(fd)
    return tmp


def _remove_files(paths: list[Path]) -> None:
    for tmp in paths:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _save_with_external_data(
    model: onnx.ModelProto,
    path: Path,
    data_path: Path,
    directory: Path,
    temps: list[Path],
    source_dir: str | os.PathLike | None,
) -> None:
    """Write ``path`` and ``data_path`` so that a failure or interrupt leaves the old pair or the new pair.

    The data file is renamed into place first, then the model (the commit point).
    If anything stops the sequence before the model is in place, the data file
    is rolled back (the previous one restored from a hard link, or removed).
    """
    data_tmp = _temp_file(directory, data_path.name, temps)
    model_tmp = _temp_file(directory, path.name, temps)
    written = _write_external(model, data_tmp, data_path.name, source_dir)
    _write_bytes(model_tmp, _serialize(written, path))
    del written
    new_data, new_model = _file_id(data_tmp), _file_id(model_tmp)
    backup: Path | None = None
    try:
        if data_path.exists():
            backup = _temp_file(directory, data_path.name, temps, create=False)
            os.link(data_path, backup)
        os.replace(data_tmp, data_path)
        os.replace(model_tmp, path)  # the commit point
    except BaseException:
        if _file_id(path) != new_model and _file_id(data_path) == new_data:
            if backup is not None and backup.exists():
                os.replace(backup, data_path)
            else:
                with contextlib.suppress(OSError):
                    data_path.unlink()
        raise


def _write_external(
    model: onnx.ModelProto, data_file: Path, location: str, source_dir: str | os.PathLike | None
) -> onnx.ModelProto:
    """Write the large tensors' bytes to ``data_file`` one at a time; returns the model that refers to them."""
    written, pairs = copy_without_data(model, EXTERNAL_DATA_MIN_BYTES)
    with open(data_file, "wb") as f:
        offset = 0
        for original, copy in pairs:
            if original.data_location == onnx.TensorProto.EXTERNAL:
                assert source_dir is not None
                source = external_location(original, source_dir)
                length = source.length
            else:
                raw = _raw_bytes(original)
                length = len(raw)
            if length >= _EXTERNAL_ALIGN_MIN_BYTES and offset % _EXTERNAL_ALIGN_BYTES:
                pad = _EXTERNAL_ALIGN_BYTES - offset % _EXTERNAL_ALIGN_BYTES
                f.write(b"\0" * pad)
                offset += pad
            if original.data_location == onnx.TensorProto.EXTERNAL:
                copy_tensor_bytes(source, f)
            else:
                f.write(raw)
                del raw
            set_location(copy, location, offset, length)
            offset += length
        f.flush()
        os.fsync(f.fileno())
    return written


def _write_streamed(model: onnx.ModelProto, path: Path, source_dir: str | os.PathLike | None) -> None:
    """One self-contained file written a tensor at a time, without a serialized copy of the model in memory.

    The message is the model's, with the main graph's initializers after the graph's other
    fields and each one's data after its other fields (protobuf readers accept fields in any order).
    """
    skeleton, pairs = copy_without_data(model, _STREAM_TENSOR_MIN_BYTES)
    originals = {id(copy): original for original, copy in pairs}
    in_main_graph = {id(t) for t in skeleton.graph.initializer}
    if any(id(copy) not in in_main_graph for _, copy in pairs):  # large tensors elsewhere: the plain way
        if has_references(model):
            raise ModelError(f"{path}: tensors outside the main graph's initializers refer to external data; "
                             "write the model with external data")
        _write_bytes(path, _serialize(model, path))
        return
    graph = onnx.GraphProto()
    graph.CopyFrom(skeleton.graph)
    del graph.initializer[:]
    head = graph.SerializeToString()
    pieces: list[tuple[bytes, onnx.TensorProto | None, int]] = []
    graph_length = len(head)
    for tensor in skeleton.graph.initializer:
        original = originals.get(id(tensor))
        if original is None:
            piece = length_delimited(5, tensor.SerializeToString())
            pieces.append((piece, None, 0))
            graph_length += len(piece)
            continue
        if original.data_location == onnx.TensorProto.EXTERNAL:
            length = external_location(original, source_dir).length
        elif original.HasField("raw_data") and tensor_nbytes(original) is not None:
            length = tensor_nbytes(original)  # checked when written (reading raw_data copies it)
        else:
            length = len(_raw_bytes(original))
        header = tensor.SerializeToString() + encode_varint(9 << 3 | 2) + encode_varint(length)  # then raw_data's bytes
        prefix = encode_varint(5 << 3 | 2) + encode_varint(len(header) + length) + header
        pieces.append((prefix, original, length))
        graph_length += len(prefix) + length
    top = onnx.ModelProto()
    top.CopyFrom(skeleton)
    top.ClearField("graph")
    with open(path, "wb") as f:
        f.write(top.SerializeToString() + encode_varint(7 << 3 | 2) + encode_varint(graph_length) + head)
        for prefix, original, length in pieces:
            f.write(prefix)
            if original is None:
                continue
            if original.data_location == onnx.TensorProto.EXTERNAL:
                copy_tensor_bytes(external_location(original, source_dir), f)
                continue
            data = original.raw_data if original.HasField("raw_data") else _raw_bytes(original)
            if len(data) != length:
                raise ModelError(f"{path}: tensor {original.name!r} holds {len(data)} bytes of data, "
                                 f"its shape and type need {length}")
            f.write(data)
            del data
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _serialize(model: onnx.ModelProto, path: Path) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GB
        raise ModelError(f"{path}: cannot serialize the model: {first_line(exc)}") from None


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    return numpy_helper.from_array(array).raw_data


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of a main-graph initializer or Constant node output. Raises :class:`ModelError`."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return tensor_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    return numpy_helper.to_array(attr.t)
    raise ModelError(f"{name!r} is not a constant tensor of the main graph")


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace the value of a main-graph initializer (or Constant) in place, keeping its name and dtype."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(_tensor_like(tensor, value))
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    attr.t.CopyFrom(_tensor_like(attr.t, value))
                    return
    raise ModelError(f"{name!r} is not a constant tensor of the main graph")


def _tensor_like(template: onnx.TensorProto, value: np.ndarray) -> onnx.TensorProto:
    dtype = helper.tensor_dtype_to_np_dtype(template.data_type)
    shape = tuple(int(d) for d in template.dims)
    new = numpy_helper.from_array(np.asarray(value).astype(dtype).reshape(shape), template.name)
    if template.doc_string:
        new.doc_string = template.doc_string
    for entry in template.metadata_props:
        new.metadata_props.add().CopyFrom(entry)
    return new
