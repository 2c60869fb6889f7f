"""Tests for onnx_dc.api.report: the per-layer table and the paper-style totals."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper as nh

import graph_builders as gb
from onnx_dc.codec.container_reader import decode_container_codes, read_container_info
from onnx_dc.api.report import format_bytes, model_report


def _all_tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for graph in gb_graphs(model):
        total += sum(nh.to_array(t).nbytes for t in graph.initializer)
        for node in graph.node:
            if node.op_type == "Constant":
                total += sum(nh.to_array(a.t).nbytes for a in node.attribute if a.name == "value")
    return total


def gb_graphs(model):
    from onnx_dc.graph.model_io import iter_graphs

    return list(iter_graphs(model.graph))


def test_rows_describe_each_container():
    model = gb.mlp()
    compressed, containers = gb.compress_all(model, sparsity=0.9, bits=4, index_bits=4)
    report = model_report(compressed)
    rows = {r.name: r for r in report.tensors}
    assert set(rows) == set(containers) == {"w1", "b1", "w2", "w3"}
    for name, container in containers.items():
        row = rows[name]
        info = read_container_info(container)
        codes, _ = decode_container_codes(container)
        assert row.shape == tuple(info.shape)
        assert row.n_weights == codes.size
        assert row.n_kept == int(np.count_nonzero(codes >= 0))
        assert row.bits == 4
        assert row.index_bits == (4 if info.layout == "sparse" else None)
        assert row.compressed_bytes == len(container)
        assert row.original_bytes == 4 * codes.size
    assert rows["w1"].kind == "fc" and rows["b1"].kind == "other"
    assert rows["w1"].op == "DCMatMul" and rows["b1"].op == "DCDecompress"
    assert abs(rows["w1"].kept_fraction - 0.1) < 0.001
    assert rows["w1"].ratio == rows["w1"].original_bytes / rows["w1"].compressed_bytes


def test_totals_count_every_weight_the_papers_way():
    model = gb.mlp()
    compressed, containers = gb.compress_all(model)
    report = model_report(compressed)
    assert report.original_bytes == _all_tensor_bytes(model)
    assert [d.name for d in report.dense] == ["b2"]
    assert report.dense_bytes == 100 * 4
    assert report.compressed_bytes == sum(len(c) for c in containers.values()) + 400
    assert report.ratio == report.original_bytes / report.compressed_bytes


def test_constants_and_subgraphs_are_counted():
    for builder in (gb.constant_weights, gb.if_model, gb.lstm):
        model = builder()
        compressed, containers = gb.compress_all(model)
        report = model_report(compressed)
        assert report.original_bytes == _all_tensor_bytes(model), builder.__name__
        assert {r.name for r in report.tensors} == set(containers)


def test_plain_model_has_no_rows_and_ratio_one():
    report = model_report(gb.convnet())
    assert report.tensors == [] and report.ratio == 1.0
    assert report.original_bytes == _all_tensor_bytes(gb.convnet())


def test_json_and_table():
    compressed, _ = gb.compress_all(gb.mlp())
    report = model_report(compressed, original_file_bytes=200_000, compressed_file_bytes=20_000, skip_reasons={"b2": "bias"})
    data = json.loads(json.dumps(report.to_dict()))
    assert {"original_bytes", "compressed_bytes", "ratio", "tensors"} <= set(data)
    assert data["file_ratio"] == 10.0
    assert data["dense_tensors"] == [{"name": "b2", "dtype": "float32", "shape": [100], "bytes": 400, "reason": "bias"}]
    assert [t["name"] for t in data["tensors"]] == ["w1", "b1", "w2", "w3"]
    table = report.format_table()
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["tensor", "kind", "shape", "weights"]
    assert any(line.startswith("w1 ") and "64x300" in line and "19,200" in line for line in lines)
    assert any(line.startswith("total (every weight)") and f"{report.ratio:.1f}x" in line for line in lines)
    assert any(line.startswith("file size") and "10.0x" in line for line in lines)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(2048) == "2.0 KiB"
    assert format_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert format_bytes(None) == "-"
