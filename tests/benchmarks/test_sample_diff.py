"""benchmarks/sample_diff.py: per-problem changes between two runs' test samples."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.unit


def _row(pid: str, rewards: list[float], tokens: list[int]) -> dict:
    return {"problem_id": pid, "rewards": rewards, "response_tokens": tokens, "texts": ["x"] * 4}


def test_gains_losses_lengths_and_cut_share(load_bench, tmp_path, capsys):
    diff = load_bench("sample_diff")
    before = {
        "p1": _row("p1", [0, 0, 0, 0], [128, 128, 128, 128]),
        "p2": _row("p2", [1, 1, 0, 0], [50, 60, 128, 100]),
        "p3": _row("p3", [1, 0, 0, 0], [20, 20, 20, 20]),
    }
    after = {
        "p1": _row("p1", [1, 1, 0, 1], [56, 56, 128, 40]),
        "p2": _row("p2", [1, 0, 0, 0], [50, 60, 128, 100]),
        "p3": _row("p3", [1, 0, 0, 0], [20, 20, 20, 20]),
    }
    result = diff.compare(before, after, limit=128)
    assert [p["problem"] for p in result["gained"]] == ["p1"]
    assert [p["problem"] for p in result["lost"]] == ["p2"]
    assert result["gained"][0]["successes"] == (0, 3)
    assert result["cut"] == pytest.approx((5 / 12, 2 / 12))
    assert result["tokens"][0] == pytest.approx((128 + 84.5 + 20) / 3)
    with pytest.raises(ValueError, match="different problems"):
        diff.compare(before, {"p1": after["p1"]}, limit=128)
    files = []
    for name, rows in (("a", before), ("b", after)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
        files.append(str(path))
    assert diff.main([*files, "--limit", "128"]) == 0
    out = capsys.readouterr().out
    assert "gained successes: 1; lost: 1" in out and "| p1 | 0/4 -> 3/4 | 128 -> 70 |" in out
