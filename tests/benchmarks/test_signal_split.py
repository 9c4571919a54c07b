"""benchmarks/signal_split.py: AUC split by the number of successes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_signal_split_separates_lone_successes_and_skips_one_class_groups(load_bench):
    signal = load_bench("signal_split")
    rows = [
        # p1: one success, ranked above both failures -> AUC 1
        {"condition": "1S", "problem": "p1", "reward": 1.0, "score": -0.1},
        {"condition": "1S", "problem": "p1", "reward": 0.0, "score": -0.5},
        {"condition": "1S", "problem": "p1", "reward": 0.0, "score": -0.2},
        # p2: two successes; one above the failure, one tied -> (1 + 0.5) / 2
        {"condition": "1S", "problem": "p2", "reward": 1.0, "score": -0.1},
        {"condition": "1S", "problem": "p2", "reward": 1.0, "score": -0.3},
        {"condition": "1S", "problem": "p2", "reward": 0.0, "score": -0.3},
        # p3: all failures -> undefined, left out
        {"condition": "1S", "problem": "p3", "reward": 0.0, "score": -0.3},
    ]
    table = signal.split(rows)
    assert table["1S"]["one success"] == (1, 1.0)
    assert table["1S"]["two or more"] == (1, 0.75)
    assert set(table["1S"]) == {"one success", "two or more"}
