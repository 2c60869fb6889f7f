"""benchmarks/bench_search_seeds.py: its table and its acceptance marks (no training, no search: those take minutes)."""

from __future__ import annotations

import json
from dataclasses import asdict

from bench_loader import load_benchmark


def _row(bench, model, seed, ratio, drop_full, drop_b):
    return bench.SeedRow(model, seed, 0.9, ratio, drop_full, 2 * drop_full - drop_b, drop_b, "fc1 10%/3b", 60.0,
                         50.0, "3.0-3.1")


def test_table_marks_a_ratio_below_85_percent_of_the_zoo_models_and_a_drop_over_the_budget():
    bench = load_benchmark("bench_search_seeds")
    rows = [
        _row(bench, "lenet5", "1", 30.0, 0.30, 0.20),     # 75 % of the zoo's ratio
        _row(bench, "lenet5", "zoo", 40.0, 0.29, 0.26),
        _row(bench, "lenet_300_100", "1", 31.0, 0.40, 0.55),  # over the budget on half B
        _row(bench, "lenet_300_100", "zoo", 32.0, 0.37, 0.45),
        _row(bench, "lenet_300_100", "2", 30.0, 0.40, 0.45),
    ]
    lines = bench.format_table(rows, 0.5).splitlines()[2:]
    assert [line.split("|")[1:3] for line in lines] == [
        [" lenet_300_100 ", " zoo "], [" lenet_300_100 ", " 1 "], [" lenet_300_100 ", " 2 "],
        [" lenet5 ", " zoo "], [" lenet5 ", " 1 "],
    ]
    assert lines[0].rstrip().endswith("| 100 % | 0.37 pp | 0.29 pp | 0.45 pp | 60 s | 50 s | 3.0-3.1 | ok |")
    assert "| 97 % |" in lines[1] and lines[1].rstrip().endswith("| misses budget |")
    assert "| 94 % |" in lines[2] and lines[2].rstrip().endswith("| ok |")
    assert "| 75 % |" in lines[4] and lines[4].rstrip().endswith("| misses ratio |")


def test_rows_of_earlier_runs_are_merged_without_searching(tmp_path, capsys):
    bench = load_benchmark("bench_search_seeds")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps([asdict(_row(bench, "lenet5", "zoo", 40.0, 0.29, 0.26)),
                                   asdict(_row(bench, "lenet5", "1", 38.0, 0.35, 0.40))]))
    out = tmp_path / "rows.json"
    assert bench.main(["--models", "lenet5", "--seeds", "--no-zoo", "--merge", str(earlier), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| lenet5 | 1 |" in table and "| 95 % |" in table
    assert [(r["model"], r["seed"]) for r in json.loads(out.read_text())] == [("lenet5", "zoo"), ("lenet5", "1")]


def test_a_margin_row_is_its_own_row_and_runs_the_tables_margin_search(monkeypatch):
    """--margin: the calibration table's 1-SE margin row (max_drops empty, margin_drops the budget), listed
    beside the plain row of the same seed and compared with the zoo's plain row."""
    import model_zoo.calibration_table as table

    bench = load_benchmark("bench_search_seeds")
    asked = {}

    def fake_rows(name, **kwargs):
        asked.update(kwargs)
        row = type("Row", (), {"accuracy_full": 91.0, "drop_full": 0.4, "drop_final": 0.45, "ratio": 36.0,
                               "settings": "conv1 100%/6b"})
        return [row]

    monkeypatch.setattr(table, "model_rows", fake_rows)
    row = bench.search_row("lenet5", "1", None, 0.5, False, [], margin=True)
    assert asked["max_drops"] == [] and asked["margin_drops"] == [0.5] and row.margin_se == table.MARGIN_SE
    plain = _row(bench, "lenet5", "1", 39.4, 0.53, 0.70)
    lines = bench.format_table([row, plain, _row(bench, "lenet5", "zoo", 40.0, 0.29, 0.26)], 0.5).splitlines()[2:]
    assert [line.split("|")[2] for line in lines] == [" zoo ", " 1 ", " 1 (1-SE margin) "]
    assert "| 90 % |" in lines[2] and lines[2].rstrip().endswith("| ok |")
    assert lines[1].rstrip().endswith("| misses budget |")
