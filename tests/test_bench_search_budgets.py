"""benchmarks/bench_search_budgets.py: its table and its argument errors (the searches take minutes)."""

from __future__ import annotations

from bench_loader import load_benchmark


def _row(**changes):
    row = {"model": "whisper-tiny-encoder", "min_cosine": 0.999, "ratio": 4.14, "eval_cosine": 0.99926,
           "budget_held": True, "metric_name": "transcript_match", "metric": 0.9375,
           "details": {"transcript_match": 0.9375, "token_agreement": 0.9985}, "n_calib": 8, "n_eval": 16,
           "wall_s": 120.0, "cpu_s": 130.0}
    return {**row, **changes}


def test_table_marks_a_budget_missed_on_the_evaluation_inputs():
    bench = load_benchmark("bench_search_budgets")
    table = bench.format_table([_row(), _row(min_cosine=0.99, eval_cosine=0.9871, budget_held=False)])
    held, missed = table.splitlines()[2:]
    assert "| 0.999 | 4.14x | 0.999260 | yes |" in held
    assert "| 0.99 |" in missed and "| NO |" in missed
    assert "token_agreement 0.9985" in held and "8 / 16" in held


def test_unknown_model_and_bad_budget_are_one_line_errors(capsys):
    bench = load_benchmark("bench_search_budgets")
    assert bench.main(["--models", "lenet5"]) == 2
    assert bench.main(["--budgets", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "lenet5" in err[0] and "1.5" in err[1]
