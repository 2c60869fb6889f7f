"""Runs benchmarks/bench_codec.py at a tiny size so the script cannot rot (no timing is checked)."""

from __future__ import annotations

from bench_loader import load_benchmark


def test_bench_codec_runs_and_prints_its_table(capsys):
    bench = load_benchmark("bench_codec")
    assert bench.main(["--sizes", "5000", "--repeats", "1"]) == 0
    output = capsys.readouterr().out
    assert "encode Mw/s" in output and "decode Mw/s" in output
    for case in bench.CASES:
        assert case.name in output


def test_bench_rows_describe_the_containers():
    bench = load_benchmark("bench_codec")
    rows = bench.run((3000,), repeats=1)
    assert [row.case for row in rows] == [case.name for case in bench.CASES]
    pruned, unpruned = rows
    assert pruned.layout == "sparse" and unpruned.layout == "dense"
    assert pruned.size_bytes < unpruned.size_bytes
    assert all(row.encode_seconds > 0 and row.decode_seconds > 0 for row in rows)
