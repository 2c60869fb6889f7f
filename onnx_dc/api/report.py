"""The per-layer compression table of a compressed model (like the paper's Tables 2-5).

:func:`model_report` reads everything from the compressed model itself (the
containers' headers and streams), so the table printed after ``compress`` and
the one ``inspect`` prints for the written file are the same.

Totals are counted the paper's way: every weight of the model, i.e. every
initializer and every ``Constant`` tensor, in all graphs. Before = the dense
size of all of them; after = the containers plus whatever was left
uncompressed (biases, small tensors, integer tensors...). The graph structure
(node protos, names) is not counted; file sizes are reported beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnx_dc.api.recipe import METADATA_KEY, Recipe
from onnx_dc.errors import ContainerError, OnnxDcError, first_line
from onnx_dc.graph.model_io import iter_graphs
from onnx_dc.graph.operators import DECOMPRESS_OPS, MATMUL_OP, META_KEPT
from onnx_dc.graph.restore import ContainerRef, find_containers
from onnx_dc.graph.weights import FLOAT_TYPES, iter_scopes


@dataclass(frozen=True)
class TensorRow:
    """One compressed tensor: its shape, what was kept, and its size before and after."""

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    n_weights: int
    n_kept: int
    n_fillers: int
    bits: int
    index_bits: int | None  # None for the dense layout (no relative indices)
    layout: str
    codebook_size: int
    original_bytes: int
    compressed_bytes: int
    op: str  # the readers of the container: DCMatMul, DCConv, DCGather, DCDecompress, joined with "+"
    decompressed_for: tuple[str, ...] = ()  # the ops that read the DCDecompress output (e.g. "com.microsoft Attention")

    @property
    def kept_fraction(self) -> float:
        """Fraction of the weights that survived pruning (0..1)."""
        return self.n_kept / self.n_weights if self.n_weights else 0.0

    @property
    def ratio(self) -> float:
        """original_bytes / compressed_bytes."""
        return _ratio(self.original_bytes, self.compressed_bytes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field and the derived ratio and kept fraction."""
        return {
            "name": self.name,
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "weights": self.n_weights,
            "kept": self.n_kept,
            "kept_fraction": self.kept_fraction,
            "fillers": self.n_fillers,
            "bits": self.bits,
            "index_bits": self.index_bits,
            "layout": self.layout,
            "codebook_size": self.codebook_size,
            "original_bytes": self.original_bytes,
            "compressed_bytes": self.compressed_bytes,
            "ratio": self.ratio,
            "op": self.op,
            "decompressed_for": list(self.decompressed_for),
        }


@dataclass(frozen=True)
class DenseTensor:
    """A weight (initializer or Constant) left uncompressed."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size_bytes: int
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "bytes": self.size_bytes,
            "reason": self.reason,
        }


@dataclass
class ModelReport:
    """Per-tensor rows and whole-model totals of a compressed model."""

    tensors: list[TensorRow]
    dense: list[DenseTensor]
    original_file_bytes: int | None = None
    compressed_file_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    recipe: Recipe | None = None  # the recipe recorded in the model, None when it carries none

    @property
    def dense_bytes(self) -> int:
        """Bytes of every tensor left uncompressed."""
        return sum(d.size_bytes for d in self.dense)

    @property
    def original_bytes(self) -> int:
        """Dense size of every weight of the model (the paper's 'before')."""
        return sum(r.original_bytes for r in self.tensors) + self.dense_bytes

    @property
    def compressed_bytes(self) -> int:
        """Containers plus the uncompressed weights (the paper's 'after')."""
        return sum(r.compressed_bytes for r in self.tensors) + self.dense_bytes

    @property
    def ratio(self) -> float:
        """original_bytes / compressed_bytes."""
        return _ratio(self.original_bytes, self.compressed_bytes)

    @property
    def n_weights(self) -> int:
        """Number of elements of the compressed tensors."""
        return sum(r.n_weights for r in self.tensors)

    @property
    def n_kept(self) -> int:
        """Number of elements of the compressed tensors that survived pruning."""
        return sum(r.n_kept for r in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable report: totals at the top level, a ``tensors`` list, the dense tensors."""
        file_ratio = None
        if self.original_file_bytes and self.compressed_file_bytes:
            file_ratio = self.original_file_bytes / self.compressed_file_bytes
        return {
            "original_bytes": self.original_bytes,
            "compressed_bytes": self.compressed_bytes,
            "ratio": self.ratio,
            "weights": self.n_weights,
            "kept": self.n_kept,
            "kept_fraction": self.n_kept / self.n_weights if self.n_weights else 0.0,
            "compressed_tensor_original_bytes": sum(r.original_bytes for r in self.tensors),
            "compressed_tensor_bytes": sum(r.compressed_bytes for r in self.tensors),
            "dense_bytes": self.dense_bytes,
            "original_file_bytes": self.original_file_bytes,
            "compressed_file_bytes": self.compressed_file_bytes,
            "file_ratio": file_ratio,
            "tensors": [r.to_dict() for r in self.tensors],
            "dense_tensors": [d.to_dict() for d in self.dense],
            "notes": list(self.notes),
            "recipe": None if self.recipe is None else self.recipe.to_dict(),
        }

    def format_table(self) -> str:
        """The table as text: one row per compressed tensor, then the totals and file sizes."""
        header = ["tensor", "kind", "shape", "weights", "kept", "w bits", "idx bits", "layout", "before", "after", "ratio"]
        rows: list[list[str]] = []
        for r in self.tensors:
            rows.append(
                [
                    r.name,
                    r.kind,
                    "x".join(str(d) for d in r.shape) or "scalar",
                    f"{r.n_weights:,}",
                    f"{100 * r.kept_fraction:.1f}%",
                    str(r.bits),
                    "-" if r.index_bits is None else str(r.index_bits),
                    r.layout,
                    format_bytes(r.original_bytes),
                    format_bytes(r.compressed_bytes),
                    f"{r.ratio:.1f}x",
                ]
            )
        footer: list[list[str]] = []
        if self.tensors:
            footer.append(
                [
                    f"compressed ({len(self.tensors)} tensors)",
                    "",
                    "",
                    f"{self.n_weights:,}",
                    f"{100 * self.n_kept / self.n_weights:.1f}%" if self.n_weights else "-",
                    "",
                    "",
                    "",
                    format_bytes(sum(r.original_bytes for r in self.tensors)),
                    format_bytes(sum(r.compressed_bytes for r in self.tensors)),
                    f"{_ratio(sum(r.original_bytes for r in self.tensors), sum(r.compressed_bytes for r in self.tensors)):.1f}x",
                ]
            )
        footer.append(
            [f"left dense ({len(self.dense)} tensors)", "", "", "", "", "", "", "", format_bytes(self.dense_bytes), format_bytes(self.dense_bytes), ""]
        )
        footer.append(
            ["total (every weight)", "", "", "", "", "", "", "", format_bytes(self.original_bytes), format_bytes(self.compressed_bytes), f"{self.ratio:.1f}x"]
        )
        if self.original_file_bytes or self.compressed_file_bytes:
            footer.append(
                [
                    "file size",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    format_bytes(self.original_file_bytes) if self.original_file_bytes else "-",
                    format_bytes(self.compressed_file_bytes) if self.compressed_file_bytes else "-",
                    f"{_ratio(self.original_file_bytes, self.compressed_file_bytes):.1f}x"
                    if self.original_file_bytes and self.compressed_file_bytes
                    else "",
                ]
            )
        right = {3, 4, 5, 6, 8, 9, 10}
        widths = [max(len(row[i]) for row in [header] + rows + footer) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            cells = (row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i]) for i in range(len(row)))
            return "  ".join(cells).rstrip()

        rule = "-" * sum(widths) + "-" * 2 * (len(widths) - 1)
        lines = [fmt(header), rule, *(fmt(row) for row in rows), rule, *(fmt(row) for row in footer)]
        if self.recipe is not None:
            lines.append(f"recipe: {self.recipe.describe()}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def model_report(
    model: onnx.ModelProto,
    *,
    original_file_bytes: int | None = None,
    compressed_file_bytes: int | None = None,
    skip_reasons: dict[str, str] | None = None,
    base_dir: str | os.PathLike | None = None,
) -> ModelReport:
    """Build the report of a compressed (or plain) model from its containers and other tensors.

    ``skip_reasons`` (weight name -> why it was left dense) annotates dense tensors.
    Containers in external data are read one at a time from ``base_dir``; dense tensors are never read.
    Raises :class:`ContainerError` naming the tensor when a container is corrupted.
    """
    refs = find_containers(model, base_dir)
    container_keys = {(id(ref.scope.graph), ref.name) for ref in refs}
    readers = _readers_by_value(model)
    rows = [_row(ref, readers) for ref in refs]
    reasons = skip_reasons or {}
    dense: list[DenseTensor] = []
    for scope in iter_scopes(model):
        graph = scope.graph
        for tensor in graph.initializer:
            if (id(graph), tensor.name) not in container_keys:
                dense.append(_dense(tensor, tensor.name, reasons))
        for sparse in graph.sparse_initializer:
            name = sparse.values.name
            size = _tensor_size_bytes(sparse.values) + _tensor_size_bytes(sparse.indices)
            dense.append(DenseTensor(name, _dtype_name(sparse.values.data_type), tuple(sparse.dims), size, "sparse initializer"))
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
                continue
            name = node.output[0]
            if (id(graph), name) in container_keys:
                continue
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    dense.append(_dense(attr.t, name, reasons))
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    size = _tensor_size_bytes(attr.sparse_tensor.values) + _tensor_size_bytes(attr.sparse_tensor.indices)
                    dense.append(DenseTensor(name, _dtype_name(attr.sparse_tensor.values.data_type), tuple(attr.sparse_tensor.dims), size, "sparse constant"))
                elif attr.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT):
                    dense.append(DenseTensor(name, "float32" if attr.type == onnx.AttributeProto.FLOAT else "int64", (), 4 if attr.type == onnx.AttributeProto.FLOAT else 8))
                elif attr.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
                    n = len(attr.floats) if attr.type == onnx.AttributeProto.FLOATS else len(attr.ints)
                    dense.append(DenseTensor(name, "float32" if attr.type == onnx.AttributeProto.FLOATS else "int64", (n,), n * (4 if attr.type == onnx.AttributeProto.FLOATS else 8)))
                elif attr.type in (onnx.AttributeProto.STRING, onnx.AttributeProto.STRINGS):
                    size = len(attr.s) if attr.type == onnx.AttributeProto.STRING else sum(len(s) for s in attr.strings)
                    dense.append(DenseTensor(name, "string", (), size))
    report = ModelReport(rows, dense, original_file_bytes, compressed_file_bytes)
    report.notes.extend(_decompressed_notes(rows) + _dense_notes(dense))
    text = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    if text is not None:
        try:
            report.recipe = Recipe.from_dict(json.loads(text))
        except (ValueError, OnnxDcError) as exc:
            report.notes.append(f"the model's recorded recipe cannot be read: {first_line(exc)}")
    return report


def format_bytes(n: int | None) -> str:
    """Human-readable size with binary units (``918.8 KiB``)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _decompressed_notes(rows: list[TensorRow]) -> list[str]:
    """One line per group of containers expanded by DCDecompress, by what reads the dense tensor."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for row in rows:
        if row.decompressed_for:
            groups.setdefault(row.decompressed_for, []).append(row.name)
    return [
        f"decompressed at session start (no fused operator reads the container): {_names(names)} "
        f"for {', '.join(readers)}"
        for readers, names in groups.items()
    ]


def _dense_notes(dense: list[DenseTensor]) -> list[str]:
    """One line per reason tensors were left dense, with what they are to their readers (``inspect`` knows no reasons).

    A reason reads ``<use>: <why>`` (the converter's) or just ``<why>``.
    """
    groups: dict[str, list[tuple[str, DenseTensor]]] = {}
    for tensor in dense:
        if tensor.reason:
            use, _, why = tensor.reason.rpartition(": ")
            groups.setdefault(why, []).append((use, tensor))
    lines = []
    for why, items in groups.items():
        uses: dict[str, int] = {}
        for use, _ in items:
            if use:
                uses[use] = uses.get(use, 0) + 1
        detail = ", ".join(f"{use} x{count}" for use, count in uses.items())
        size = format_bytes(sum(t.size_bytes for _, t in items))
        names = _names([t.name for _, t in items])
        lines.append(f"left dense, {why}: {len(items)} tensors, {size}" + (f" ({detail})" if detail else f": {names}"))
    return lines


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _readers_by_value(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Value name -> the ops reading it anywhere in the model (``com.microsoft Attention``, ``graph output``)."""
    readers: dict[str, set[str]] = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            domain = "" if node.domain in ("", "ai.onnx") else node.domain + " "
            for name in node.input:
                readers.setdefault(name, set()).add(domain + node.op_type)
        for output in graph.output:
            readers.setdefault(output.name, set()).add("graph output")
    return readers


def _decompressed_readers(ref: ContainerRef, readers: dict[str, set[str]]) -> tuple[str, ...]:
    """The ops reading the outputs of the container's DCDecompress nodes."""
    found: set[str] = set()
    for _, node in ref.readers:
        if node.op_type in DECOMPRESS_OPS.values():
            found |= readers.get(node.output[0], set())
    return tuple(sorted(found))


def _row(ref: ContainerRef, readers: dict[str, set[str]]) -> TensorRow:
    from onnx_dc.codec.container_reader import decode_container_symbols, read_container_info

    data = ref.data
    recorded = _recorded_kept(ref.tensor)
    try:
        if recorded is not None:  # the converter's count: the header (checksum included) is enough
            info = read_container_info(data)
            n_kept = recorded if recorded <= min(info.entries, info.numel) else None
        if recorded is None or n_kept is None:
            info, code_symbols, _ = decode_container_symbols(data)
            n_kept = int(np.count_nonzero(code_symbols != info.codebook_size))
    except ContainerError as exc:
        raise ContainerError(f"container {ref.name!r} (tensor {ref.original_name!r}): {exc}") from None
    n_fillers = info.entries - n_kept if info.layout == "sparse" else 0
    ops = sorted({node.op_type for _, node in ref.readers})
    kind = ref.kind or ("fc" if ops == [MATMUL_OP] else "other")
    dtype = str(info.dtype) if info.dtype != np.dtype("float32") else "float32"
    return TensorRow(
        name=ref.original_name,
        kind=kind,
        dtype=dtype,
        shape=tuple(info.shape),
        n_weights=info.numel,
        n_kept=n_kept,
        n_fillers=n_fillers,
        bits=info.bits,
        index_bits=info.index_bits if info.layout == "sparse" else None,
        layout=info.layout,
        codebook_size=info.codebook_size,
        original_bytes=info.numel * info.dtype.itemsize,
        compressed_bytes=len(data),
        op="+".join(ops),
        decompressed_for=_decompressed_readers(ref, readers),
    )


def _dense(tensor: onnx.TensorProto, name: str, reasons: dict[str, str]) -> DenseTensor:
    reason = reasons.get(name)
    if reason is None and reasons and tensor.data_type not in FLOAT_TYPES:
        reason = "not a floating-point tensor"
    return DenseTensor(
        name,
        _dtype_name(tensor.data_type),
        tuple(int(d) for d in tensor.dims),
        _tensor_size_bytes(tensor),
        reason,
    )


def _dtype_name(data_type: int) -> str:
    if data_type in FLOAT_TYPES:
        return FLOAT_TYPES[data_type]
    try:
        return onnx.TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"type{data_type}"


def _tensor_size_bytes(tensor: onnx.TensorProto) -> int:
    """Dense size of a tensor's values in bytes (strings: their total length)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    numel = int(np.prod([int(d) for d in tensor.dims], dtype=np.int64)) if len(tensor.dims) else 1
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        for entry in tensor.external_data:
            if entry.key == "length":
                return int(entry.value)
    try:
        np_dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        itemsize = np.dtype(np_dtype).itemsize
    except (KeyError, TypeError, ValueError):
        return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or (
        hasattr(onnx.TensorProto, "FLOAT4E2M1") and tensor.data_type == onnx.TensorProto.FLOAT4E2M1
    ):
        return (numel + 1) // 2
    return numel * itemsize


def _recorded_kept(tensor: onnx.TensorProto) -> int | None:
    """The kept count the converter recorded on a container (``onnx_dc.kept``), if any."""
    for entry in tensor.metadata_props:
        if entry.key == META_KEPT:
            try:
                return int(entry.value)
            except ValueError:
                return None
    return None


def _ratio(before: int | None, after: int | None) -> float:
    if not before or not after:
        return 1.0 if before == after else float("inf") if not after else 0.0
    return before / after
