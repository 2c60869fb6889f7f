"""Readers for the weight files the exported models come from, into float32 numpy arrays.

* :func:`read_safetensors`: the ``safetensors`` format (an 8-byte little-endian header
  length, a JSON header naming each tensor's dtype, shape and byte range, then the raw
  little-endian data). Twenty lines of numpy, so the ``safetensors`` package is not needed.
* :func:`read_ctranslate2`: CTranslate2's ``model.bin`` (binary version >= 5: a spec
  name, then named variables with rank, dims, dtype code and raw data, then aliases).
* :func:`read_gguf`: llama.cpp's GGUF through the pure-Python ``gguf`` package, every
  tensor dequantized to float32 (Q4_1, Q8_0, F16, F32 ...) and reshaped to the
  PyTorch ``[out, in]`` layout, with the file's key/value metadata.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from onnx_dc.errors import ModelError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a numpy array (BF16 widened to float32)."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ModelError(f"{path} is too short to be a safetensors file")
    (header_length,) = struct.unpack_from("<Q", data, 0)
    try:
        header = json.loads(data[8:8 + header_length])
    except ValueError as error:
        raise ModelError(f"{path}: bad safetensors header ({error})") from None
    base = 8 + header_length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = data[base + begin:base + end]
        if entry["dtype"] == "BF16":
            values = _bfloat16_to_float32(raw)
        elif entry["dtype"] in _SAFETENSORS_DTYPES:
            values = np.frombuffer(raw, dtype=np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<"))
        else:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        tensors[name] = values.reshape(entry["shape"])
    return tensors


def read_ctranslate2(path: str | Path) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` (format version >= 5), aliases resolved."""
    data = Path(path).read_bytes()
    offset = 0

    def unpack(fmt: str):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values[0]

    def string() -> str:
        nonlocal offset
        length = unpack("<H")  # includes the terminating NUL
        text = data[offset:offset + length - 1].decode("utf-8")
        offset += length
        return text

    version = unpack("<I")
    if version < 5:
        raise ModelError(f"{path}: CTranslate2 model format {version} is not supported (need >= 5)")
    string()  # the model spec name
    unpack("<I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(unpack("<I")):
        name = string()
        dims = [unpack("<I") for _ in range(unpack("<B"))]
        dtype = _CT2_DTYPES.get(unpack("<B"))
        size = unpack("<I")
        raw = data[offset:offset + size]
        offset += size
        if dtype is None:
            raise ModelError(f"{path}: variable {name} has an unknown dtype")
        values = _bfloat16_to_float32(raw) if dtype == "bfloat16" else np.frombuffer(raw, dtype=dtype)
        variables[name] = values.reshape(dims)
    if offset < len(data):
        for _ in range(unpack("<I")):
            alias = string()
            variables[alias] = variables[string()]
    return variables


def read_gguf(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Dequantized float32 tensors (PyTorch layout) and the metadata of a GGUF file.

    Metadata values are Python scalars, strings or lists. Needs the ``gguf`` package
    (``pip install gguf``, in onnx-dc's ``real`` extra).
    """
    try:
        import gguf
    except ImportError:
        raise ModelError("reading GGUF files needs the 'gguf' package (pip install 'onnx-dc[real]')") from None
    reader = gguf.GGUFReader(str(path))
    metadata = {name: _gguf_value(field, gguf) for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dimensions fastest-varying first; PyTorch's [out, in] is the reverse.
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        tensors[tensor.name] = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
    return tensors, metadata


def _gguf_value(field, gguf):
    kinds = field.types
    if not kinds:
        return None
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if kinds[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[index]).decode("utf-8") for index in field.data]
        return [field.parts[index][0].item() for index in field.data]
    value = field.parts[field.data[0]]
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    return value[0].item()


def _bfloat16_to_float32(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
