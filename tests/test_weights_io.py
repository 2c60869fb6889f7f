"""Tests of model_zoo.real.weights_io: the safetensors, CTranslate2 and GGUF readers, on files written here."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from onnx_dc.errors import ModelError
from model_zoo.real import weights_io


def _safetensors(path, tensors: dict[str, tuple[str, np.ndarray, bytes]]) -> None:
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, array, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_safetensors_reader_decodes_every_dtype(tmp_path):
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    f16 = np.array([[1.5, -2.25]], dtype=np.float16)
    i64 = np.array([3, -4], dtype=np.int64)
    bf16_source = np.array([1.0, -0.5, 3.25], dtype=np.float32)
    bf16_raw = (bf16_source.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = tmp_path / "model.safetensors"
    _safetensors(path, {
        "a": ("F32", f32, f32.tobytes()), "b": ("F16", f16, f16.tobytes()),
        "c": ("I64", i64, i64.tobytes()), "d": ("BF16", bf16_source, bf16_raw),
    })
    tensors = weights_io.read_safetensors(path)
    assert set(tensors) == {"a", "b", "c", "d"}
    np.testing.assert_array_equal(tensors["a"], f32)
    np.testing.assert_array_equal(tensors["b"], f16)
    np.testing.assert_array_equal(tensors["c"], i64)
    np.testing.assert_array_equal(tensors["d"], bf16_source)  # exactly representable in bfloat16


def test_safetensors_reader_rejects_bad_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(ModelError, match="too short"):
        weights_io.read_safetensors(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ModelError, match="bad safetensors header"):
        weights_io.read_safetensors(garbage)


def _ct2_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def test_ctranslate2_reader_reads_variables_and_aliases(tmp_path):
    weight = np.arange(12, dtype=np.float16).reshape(3, 4)
    heads = np.array(6, dtype=np.int16)
    body = struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", 2)
    for name, array, code in (("encoder/w", weight, 4), ("encoder/num_heads", heads, 2)):
        raw = array.tobytes()
        body += _ct2_string(name) + struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape)
        body += struct.pack("<B", code) + struct.pack("<I", len(raw)) + raw
    body += struct.pack("<I", 1) + _ct2_string("decoder/w") + _ct2_string("encoder/w")
    path = tmp_path / "model.bin"
    path.write_bytes(body)
    variables = weights_io.read_ctranslate2(path)
    np.testing.assert_array_equal(variables["encoder/w"], weight)
    assert int(variables["encoder/num_heads"]) == 6
    assert variables["decoder/w"] is variables["encoder/w"]
    old = tmp_path / "old.bin"
    old.write_bytes(struct.pack("<I", 4))
    with pytest.raises(ModelError, match="format 4 is not supported"):
        weights_io.read_ctranslate2(old)


def test_gguf_reader_dequantizes_to_pytorch_layout(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((4, 64)).astype(np.float32)  # [out, in] as PyTorch stores it
    quantized = rng.standard_normal((2, 64)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list(["a", "b"])
    writer.add_tensor("dense.weight", dense)
    q8 = gguf.quants.quantize(quantized, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors, metadata = weights_io.read_gguf(path)
    np.testing.assert_array_equal(tensors["dense.weight"], dense)
    assert tensors["q8.weight"].shape == (2, 64) and tensors["q8.weight"].dtype == np.float32
    np.testing.assert_allclose(tensors["q8.weight"], quantized, atol=np.abs(quantized).max() / 100)
    assert metadata["llama.block_count"] == 1 and metadata["tokenizer.ggml.tokens"] == ["a", "b"]
