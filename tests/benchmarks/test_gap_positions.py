"""benchmarks/gap_positions.py: the teacher's gap split by token position."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.unit


def test_gap_positions_split_first_middle_last_by_outcome(load_bench):
    gaps = load_bench("gap_positions")
    rows = [
        {"condition": "2S1F", "reward": 1.0, "gap": [-1.0, 0.0, 0.2, -0.1]},
        {"condition": "2S1F", "reward": 1.0, "gap": [-2.0, -0.1]},  # no middle tokens
        {"condition": "2S1F", "reward": 0.0, "gap": [0.5, -1.0, -2.0, -0.3]},
        {"condition": "2S1F", "reward": 0.0, "gap": []},  # empty response: left out
        {"condition": "base", "reward": 1.0, "gap": [0.0, 0.0, 0.0]},
    ]
    table = gaps.positions(rows)
    success, failure = table["2S1F"]["success"], table["2S1F"]["failure"]
    assert success["first"] == pytest.approx(-1.5)
    assert success["middle"] == pytest.approx(0.1)  # the first row's (0.0 + 0.2) / 2 alone
    assert success["last"] == pytest.approx(-0.1)
    assert failure == pytest.approx({"first": 0.5, "middle": -1.5, "last": -0.3})
    assert all(math.isnan(v) for v in table["base"]["failure"].values())
    lines = gaps.markdown(table).splitlines()
    assert lines[2] == "| 2S1F | -1.50 | +0.10 | -0.10 | +0.50 | -1.50 | -0.30 |"


def test_gap_positions_reads_a_scores_file(load_bench, tmp_path, capsys):
    gaps = load_bench("gap_positions")
    path = tmp_path / "scores.jsonl"
    path.write_text(json.dumps({"condition": "1S", "reward": 1.0, "gap": [-0.5, 0.0]}) + "\n")
    gaps.main([str(path)])
    assert "| 1S | -0.50 | +nan | +0.00 |" in capsys.readouterr().out
