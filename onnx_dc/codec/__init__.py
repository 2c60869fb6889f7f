"""The codec layer: Deep Compression's stages on numpy arrays, and the container format.

numpy in, numpy out; nothing here knows ONNX. One module per stage:
:mod:`~onnx_dc.codec.pruning` (magnitude pruning), :mod:`~onnx_dc.codec.clustering`
(weight sharing by 1-D k-means), :mod:`~onnx_dc.codec.relative_indices` (sparse
positions as small gaps with fillers), :mod:`~onnx_dc.codec.huffman` and
:mod:`~onnx_dc.codec.bitstream` (entropy coding), :mod:`~onnx_dc.codec.container`
and :mod:`~onnx_dc.codec.container_reader` (the checksummed per-tensor format of
docs/FORMAT.md), :mod:`~onnx_dc.codec.tensor` (one tensor through every stage) and
:mod:`~onnx_dc.codec.accounting` (where a container's bytes go).
"""

from __future__ import annotations

from onnx_dc.codec.container import ContainerInfo, encode_container
from onnx_dc.codec.container_reader import decode_container, decode_container_codes, read_container_info
from onnx_dc.codec.tensor import CompressedTensor, TensorSettings, compress_tensor

__all__ = [
    "CompressedTensor",
    "ContainerInfo",
    "TensorSettings",
    "compress_tensor",
    "decode_container",
    "decode_container_codes",
    "encode_container",
    "read_container_info",
]
