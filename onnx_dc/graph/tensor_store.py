"""Weights left in their files: loading a model without its tensor data, reading one tensor at a time.

A model of several gigabytes cannot be held in memory twice (once as the
input, once as the output, plus what compressing needs), so the converter
opens it with :func:`open_model`: the returned ``onnx.ModelProto`` holds the
graph and every small tensor, but each large main-graph initializer only
*refers* to its bytes, as ONNX external data does (``data_location =
EXTERNAL`` with ``location``, ``offset`` and ``length``):

* a tensor already in external data keeps its reference (checked: a
  relative path inside the model's directory, a regular file, offset and length
  inside it, the length the tensor's shape and type need);
* a tensor whose ``raw_data`` is inline in the ``.onnx`` file gets a reference to
  those bytes *in the model file itself* (found by walking the protobuf wire
  format, so the file is parsed without reading the tensors).

Either way the references are valid ONNX relative to the model's directory.
:func:`tensor_values` reads one tensor as a read-only ``numpy.memmap`` (its
pages come from the page cache and are dropped when the array is), and
:func:`materialize` reads references back into the proto (for a model that
must be self-contained, e.g. written as one file).

A model opened with ``open_model(path, anchored=True)`` also records in every
reference the directory it is relative to (the entry :data:`ANCHOR_KEY`, which
the loader writes itself and never takes from the file), so that
:func:`tensor_array` reads any of its tensors without being told where the
model came from: the calibrated path passes such a model through code written
for models held in memory.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from onnx_dc.errors import ModelError

__all__ = [
    "ANCHOR_KEY",
    "MIN_REFERENCE_BYTES",
    "PLACEHOLDER",
    "TensorLocation",
    "all_tensors",
    "check_model_file",
    "copy_tensor_bytes",
    "copy_without_data",
    "encode_varint",
    "external_location",
    "has_references",
    "iter_graphs",
    "length_delimited",
    "materialize",
    "open_model",
    "parse_model_bytes",
    "read_structure",
    "set_location",
    "stored_bytes",
    "structure_of",
    "tensor_array",
    "tensor_bytes_of",
    "tensor_nbytes",
    "tensor_values",
]

#: The file name :func:`structure_of` points data-less tensors at.
PLACEHOLDER = "onnx_dc_placeholder.bin"

#: The external-data entry :func:`open_model` (``anchored=True``) writes: the directory of the model file.
ANCHOR_KEY = "onnx_dc.base_dir"

#: Inline tensors at least this large are left in the model file by :func:`open_model`.
MIN_REFERENCE_BYTES = 64 * 1024

_COPY_CHUNK = 16 << 20

# Protobuf field numbers (onnx.proto3).
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes are: ``length`` bytes at ``offset`` of the file ``path`` (absolute)."""

    path: Path
    offset: int
    length: int


def open_model(path: str | os.PathLike, *, anchored: bool = False) -> onnx.ModelProto:
    """Load an ONNX model file leaving every large initializer's data in its file (see the module docstring).

    ``anchored``: every reference also records the model's directory (:data:`ANCHOR_KEY`), so that
    :func:`tensor_array` reads it.

    Raises:
        ModelError: a missing or unreadable file, not an ONNX model, or external data
            that is missing, outside the model's directory or too short.
    """
    path = Path(path)
    model = read_structure(path)
    if not model.HasField("graph") or model.ir_version <= 0 or len(model.opset_import) == 0:
        raise ModelError(f"{path}: not an ONNX model (no graph, IR version or opset import)")
    base = path.resolve().parent
    for tensor in _referencing_tensors(model):
        location = external_location(tensor, base)
        expected = tensor_nbytes(tensor)
        if expected is not None and location.length != expected:
            raise ModelError(
                f"{path}: cannot load external data: tensor {tensor.name!r} has {location.length} bytes "
                f"of data, its shape and type need {expected}"
            )
        _set_anchor(tensor, base if anchored else None)  # an anchor read from the file is never kept
    return model


def _set_anchor(tensor: onnx.TensorProto, base: Path | None) -> None:
    entries = [(e.key, e.value) for e in tensor.external_data if e.key != ANCHOR_KEY]
    if base is None and len(entries) == len(tensor.external_data):
        return
    del tensor.external_data[:]
    for key, value in entries + ([(ANCHOR_KEY, str(base))] if base is not None else []):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def anchor_of(tensor: onnx.TensorProto) -> str | None:
    """The directory an anchored reference is relative to (None: not anchored)."""
    for entry in tensor.external_data:
        if entry.key == ANCHOR_KEY:
            return entry.value
    return None


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values: ``numpy_helper.to_array`` of an inline tensor, a read-only memory map of an
    anchored reference (:func:`open_model` with ``anchored=True``).

    Raises:
        ModelError: a reference that is not anchored (the model's directory is not known).
    """
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    return tensor_values(tensor, anchor_of(tensor))


def read_structure(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX model file with its large inline initializers turned into references into the file.

    The file is read through a memory map and only the protobuf fields around the
    tensors' bytes are touched. The references are not checked (:func:`open_model` does).
    Raises :class:`ModelError` for a missing, unreadable or non-ONNX file.
    """
    path = check_model_file(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ModelError(f"{path}: not an ONNX model (the file is not a valid ModelProto)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                stripped = _strip_model(data, path.name)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except _WireError:
        raise ModelError(f"{path}: not an ONNX model (the file is not a valid ModelProto)") from None
    return parse_model_bytes(stripped, path)


def parse_model_bytes(data: bytes, path: str | os.PathLike) -> onnx.ModelProto:
    """``data`` parsed as a ModelProto; :class:`ModelError` naming ``path`` when it is not one."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise ModelError(f"{path}: not an ONNX model (the file is not a valid ModelProto)") from None
    return model


def check_model_file(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path` if it names an existing file; :class:`ModelError` otherwise."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not an ONNX model file")
    return path


def has_references(model: onnx.ModelProto) -> bool:
    """True when some tensor of the model (any graph) refers to external data."""
    return any(True for _ in _referencing_tensors(model))


def external_location(tensor: onnx.TensorProto, base_dir: str | os.PathLike) -> TensorLocation:
    """The checked location of an external tensor's bytes, relative to ``base_dir``.

    Raises:
        ModelError: no location, a location outside ``base_dir``, a missing file,
            or an offset and length that do not fit in it.
    """
    entries = {entry.key: entry.value for entry in tensor.external_data}
    name = tensor.name
    location = entries.get("location", "")
    if not location:
        raise ModelError(f"cannot load external data: tensor {name!r} has no location")
    base = Path(base_dir).resolve()
    relative = Path(location)
    if relative.is_absolute() or ".." in relative.parts:
        raise ModelError(f"cannot load external data: tensor {name!r}: location {location!r} is outside the model's directory")
    file = (base / relative).resolve()
    if base not in file.parents:
        raise ModelError(f"cannot load external data: tensor {name!r}: location {location!r} is outside the model's directory")
    try:
        offset = int(entries.get("offset", "0"))
        file_size = file.stat().st_size
        length = int(entries["length"]) if "length" in entries else file_size - offset
    except FileNotFoundError:
        raise ModelError(f"cannot load external data: tensor {name!r}: {location} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load external data: tensor {name!r}: {exc}") from None
    if not file.is_file():
        raise ModelError(f"cannot load external data: tensor {name!r}: {location} is not a regular file")
    if offset < 0 or length < 0 or offset + length > file_size:
        raise ModelError(
            f"cannot load external data: tensor {name!r}: {length} bytes at offset {offset} "
            f"pass the end of {location} ({file_size} bytes)"
        )
    return TensorLocation(file, offset, length)


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's data as raw little-endian values (None for strings and unknown types)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    numel = int(np.prod([int(d) for d in tensor.dims], dtype=np.int64))
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (numel + 1) // 2
    return numel * itemsize


def tensor_values(tensor: onnx.TensorProto, base_dir: str | os.PathLike | None) -> np.ndarray:
    """The values of a tensor: a read-only memory map of its external bytes, else ``numpy_helper.to_array``."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    if base_dir is None:
        raise ModelError(f"tensor {tensor.name!r} refers to external data, but the model's directory is not known")
    location = external_location(tensor, base_dir)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = tuple(int(d) for d in tensor.dims)
    if location.length == 0:
        return np.zeros(shape, dtype=dtype)
    try:
        return np.memmap(location.path, dtype=dtype, mode="r", offset=location.offset, shape=shape)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:  # no address space left for the map: out of memory, said as such
            raise MemoryError(f"mapping tensor {tensor.name!r} ({location.length} bytes) needs more memory") from exc
        raise


def tensor_bytes_of(tensor: onnx.TensorProto, base_dir: str | os.PathLike | None) -> bytes:
    """A tensor's raw bytes: ``raw_data``, or read from its external data (relative to ``base_dir``)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    if base_dir is None:
        raise ModelError(f"tensor {tensor.name!r} refers to external data, but the model's directory is not known")
    location = external_location(tensor, base_dir)
    with open(location.path, "rb") as f:
        f.seek(location.offset)
        return f.read(location.length)


def copy_tensor_bytes(location: TensorLocation, out) -> None:
    """Write the bytes at ``location`` to the open binary file ``out``, a chunk at a time."""
    with open(location.path, "rb") as f:
        f.seek(location.offset)
        remaining = location.length
        while remaining:
            chunk = f.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                raise ModelError(f"{location.path}: ended before {location.length} bytes at offset {location.offset}")
            out.write(chunk)
            remaining -= len(chunk)


def materialize(model: onnx.ModelProto, base_dir: str | os.PathLike) -> None:
    """Read every external tensor's bytes into the model (in place): a self-contained model."""
    for tensor in list(_referencing_tensors(model)):
        location = external_location(tensor, base_dir)
        with open(location.path, "rb") as f:
            f.seek(location.offset)
            data = f.read(location.length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data


def _referencing_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yield ``graph`` and every subgraph nested in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers, sparse initializers' parts and tensor attributes, in all graphs."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor takes in a model, about: its external data's length, else its data's size.

    Computed from the shape and type where the data is ``raw_data`` (protobuf's ``ByteSize``
    would serialize the tensor to measure it), else by ``ByteSize``.
    """
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                try:
                    return int(entry.value)
                except ValueError:
                    break
    if tensor.HasField("raw_data"):
        nbytes = tensor_nbytes(tensor)
        if nbytes is not None:
            return nbytes + len(tensor.name) + 16 + 10 * len(tensor.dims)
    return tensor.ByteSize()


# ----------------------------------------------------------------------------- copies without the data

_DATA_FIELDS = frozenset(
    {"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"}
)
_LOCATION_FIELDS = frozenset({"external_data", "data_location"})
_STRUCTURE_ONLY_ATTRIBUTES = frozenset(
    {onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS, onnx.AttributeProto.GRAPH,
     onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR}
)


def copy_without_data(
    model: onnx.ModelProto, min_bytes: int
) -> tuple[onnx.ModelProto, list[tuple[onnx.TensorProto, onnx.TensorProto]]]:
    """A copy of ``model`` whose large tensors carry no data, and the pairs (original, data-less copy).

    A tensor is left without data (no data fields, no location) when it refers to
    external data or stores at least ``min_bytes`` (string tensors never); the
    caller writes its bytes somewhere and points the copy there. The model itself is
    not modified and nothing large is copied, so this costs memory for the graph only.
    """
    copy = onnx.ModelProto()
    pairs: list[tuple[onnx.TensorProto, onnx.TensorProto]] = []
    _copy_message(model, copy, pairs, min_bytes)
    return copy, pairs


def _repeated(field) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def _copy_message(source, target, pairs: list, min_bytes: int) -> None:
    if isinstance(source, onnx.TensorProto):
        if source.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or (
            source.data_location != onnx.TensorProto.EXTERNAL and stored_bytes(source) < min_bytes
        ):
            target.CopyFrom(source)
            return
        pairs.append((source, target))
        _copy_tensor_fields(source, target, _DATA_FIELDS | _LOCATION_FIELDS)
        return
    elif isinstance(source, onnx.NodeProto) and not any(a.type in _STRUCTURE_ONLY_ATTRIBUTES for a in source.attribute):
        target.CopyFrom(source)
        return
    else:
        skip = frozenset()
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.type == field.TYPE_MESSAGE:
            if _repeated(field):
                container = getattr(target, field.name)
                for item in value:
                    _copy_message(item, container.add(), pairs, min_bytes)
            else:
                sub = getattr(target, field.name)
                sub.SetInParent()  # an empty sub-message is still present (e.g. a scalar's shape)
                _copy_message(value, sub, pairs, min_bytes)
        elif _repeated(field):
            getattr(target, field.name).extend(value)
        else:
            setattr(target, field.name, value)


def structure_of(model: onnx.ModelProto, min_bytes: int = 4096) -> onnx.ModelProto:
    """A copy of the model whose tensors of ``min_bytes`` or more are marked external at a placeholder.

    For ``onnx.checker`` and shape inference, which need the graph and every tensor's
    type and shape but not the data: costs memory for the graph only, and is never
    over the protobuf limit because of the weights.
    """
    copy, pairs = copy_without_data(model, min_bytes)
    for original, tensor in pairs:
        nbytes = tensor_nbytes(original)
        set_location(tensor, PLACEHOLDER, 0, stored_bytes(original) if nbytes is None else nbytes)
    return copy


def _copy_tensor_fields(source: onnx.TensorProto, target: onnx.TensorProto, skip: frozenset[str]) -> None:
    """Copy a tensor's fields but ``skip``, field by field: the data fields are never read (reading
    ``raw_data`` would copy it)."""
    for field in source.DESCRIPTOR.fields:
        name = field.name
        if name in skip:
            continue
        if _repeated(field):
            values = getattr(source, name)
            if len(values):
                if field.type == field.TYPE_MESSAGE:
                    for item in values:
                        getattr(target, name).add().CopyFrom(item)
                else:
                    getattr(target, name).extend(values)
        elif source.HasField(name):
            if field.type == field.TYPE_MESSAGE:
                getattr(target, name).CopyFrom(getattr(source, name))
            else:
                setattr(target, name, getattr(source, name))


def set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Mark a data-less tensor as external data at ``offset`` of ``location`` (relative to the model)."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# ----------------------------------------------------------------------------- protobuf wire format


class _WireError(Exception):
    pass


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    """A non-negative integer in protobuf's varint encoding."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(data, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start incl. tag, value start, value end) of each field."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == _WIRE_VARINT:
            _, value_end = _varint(data, pos, end)
        elif wire == _WIRE_I64:
            value_end = pos + 8
        elif wire == _WIRE_I32:
            value_end = pos + 4
        elif wire == _WIRE_LEN:
            length, pos = _varint(data, pos, end)
            value_end = pos + length
        else:
            raise _WireError
        if field == 0 or value_end > end:
            raise _WireError
        yield field, wire, field_start, pos, value_end
        pos = value_end


def length_delimited(field: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field (a message, bytes or a string): tag, length, payload."""
    return encode_varint(field << 3 | _WIRE_LEN) + encode_varint(len(payload)) + payload


def _strip_model(data, file_name: str) -> bytes:
    """The model's bytes with large initializers' raw data replaced by references into ``file_name``."""

    def graph(start: int, end: int) -> bytes:
        return _rewrite_field(data, start, end, _GRAPH_INITIALIZER, lambda s, e: _strip_tensor(data, s, e, file_name))

    return _rewrite_field(data, 0, len(data), _MODEL_GRAPH, graph)


def _rewrite_field(data, start: int, end: int, number: int, rewrite) -> bytes:
    """The message ``data[start:end]`` with each length-delimited field ``number`` replaced by ``rewrite(s, e)``."""
    parts = []
    for field, wire, field_start, value_start, value_end in _fields(data, start, end):
        if field == number and wire == _WIRE_LEN:
            parts.append(length_delimited(number, rewrite(value_start, value_end)))
        else:
            parts.append(data[field_start:value_end])
    return b"".join(parts)


def _strip_tensor(data, start: int, end: int, file_name: str) -> bytes:
    fields = list(_fields(data, start, end))
    raw = [f for f in fields if f[0] == _TENSOR_RAW_DATA and f[1] == _WIRE_LEN]
    external = any(f[0] in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION) for f in fields)
    if len(raw) != 1 or external or raw[0][4] - raw[0][3] < MIN_REFERENCE_BYTES:
        return bytes(data[start:end])
    _, _, _, raw_start, raw_end = raw[0]
    parts = [data[f[2] : f[4]] for f in fields if f[0] != _TENSOR_RAW_DATA]
    for key, value in (("location", file_name), ("offset", str(raw_start)), ("length", str(raw_end - raw_start))):
        entry = length_delimited(1, key.encode()) + length_delimited(2, value.encode())
        parts.append(length_delimited(_TENSOR_EXTERNAL_DATA, entry))
    parts.append(encode_varint(_TENSOR_DATA_LOCATION << 3 | _WIRE_VARINT) + encode_varint(onnx.TensorProto.EXTERNAL))
    return b"".join(parts)
