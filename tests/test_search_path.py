"""Tests of model_zoo.search_path (the diagnostic of the automatic search's path)."""

from __future__ import annotations

import numpy as np
import pytest

from model_zoo.search_path import PathPoint, format_markdown, main, paired_drop


def test_paired_drop_counts_broken_and_fixed_samples():
    before = np.array([True] * 8 + [False] * 2)
    after = before.copy()
    after[:3] = False  # three became wrong
    after[8] = True  # one became right
    drop, se = paired_drop(before, after)
    assert drop == pytest.approx(20.0)  # (3 - 1) / 10
    assert se == pytest.approx(100 * np.sqrt((4 / 10 - 0.2**2) / 10))
    assert paired_drop(before, before) == (0.0, 0.0)


def test_format_marks_the_chosen_configuration():
    points = [
        PathPoint(3, "fc1 20%/3b", 25.0, 0.3, 0.1, 0.2, 0.15, 0.4, 0.15, False),
        PathPoint(4, "fc1 10%/3b", 31.0, 0.5, 0.1, 0.4, 0.15, 0.6, 0.15, True),
    ]
    text = format_markdown("lenet_300_100", points, 10000)
    assert "| 4 (chosen) | fc1 10%/3b | 31.0x | 0.50 +- 0.10 | 0.40 +- 0.15 | 0.60 +- 0.15 |" in text
    assert "| 3 | fc1 20%/3b | 25.0x |" in text


@pytest.mark.slow  # the full suite only: the automatic search on a LeNet, for real
def test_runs_on_a_lenet(tmp_path, capsys):
    out = tmp_path / "path.md"
    assert main(["--quick", "--around", "1", "--calib-samples", "1024", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert 1 <= len(rows) <= 3
    assert sum("(chosen)" in row for row in rows) == 1
    with pytest.raises(SystemExit):
        main(["--around", "-1"])
