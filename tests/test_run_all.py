"""Tests of benchmarks/run_all.py: the list is complete and a benchmark runs through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import run_all

pytestmark = pytest.mark.slow  # the full suite only: a benchmark at a tiny size


def test_every_benchmark_script_is_listed_and_exists():
    listed = {benchmark.name for benchmark in run_all.BENCHMARKS}
    scripts = {path.stem for path in run_all.BENCHMARKS_DIR.glob("bench_*.py")}
    assert scripts <= listed
    for benchmark in run_all.BENCHMARKS:
        assert benchmark.script.is_file(), benchmark.script


def test_list_names_every_benchmark(capsys):
    assert run_all.main(["--list"]) == 0
    out = capsys.readouterr().out
    for benchmark in run_all.BENCHMARKS:
        assert benchmark.name in out


def test_unknown_benchmark_is_a_one_line_error(capsys):
    assert run_all.main(["--only", "no_such_bench"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no_such_bench" in err and "\n" not in err


def test_quick_codec_benchmark_runs_and_prints_its_table(capfd):
    assert run_all.main(["--quick", "--only", "bench_codec"]) == 0
    out = capfd.readouterr().out
    assert "=== bench_codec: ok" in out


def test_failing_benchmark_gives_exit_code_1(monkeypatch, tmp_path: Path, capfd):
    script = tmp_path / "bench_broken.py"
    script.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(run_all, "BENCHMARKS_DIR", tmp_path)
    monkeypatch.setattr(run_all, "BENCHMARKS", (run_all.Benchmark("bench_broken", "always fails"),))
    assert run_all.main([]) == 1
    captured = capfd.readouterr()
    assert "FAILED (exit 3)" in captured.out
    assert "bench_broken" in captured.err
