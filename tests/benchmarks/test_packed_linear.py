"""benchmarks/packed_linear.py on a small weight: both paths timed, one row per size."""

from __future__ import annotations

import json
import sys

import pytest

from mopd.models.packing import packing_available

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not packing_available(), reason="this CPU/torch cannot pack bf16 weights"),
]


def test_each_row_count_gets_a_plain_and_a_packed_time(load_bench, monkeypatch, tmp_path):
    bench = load_bench("packed_linear")
    argv = ["packed_linear.py", "--shapes", "64x32", "--rows", "1,8", "--reps", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--threads", "1", "--out", str(tmp_path)])
    bench.main()
    rows = json.loads((tmp_path / "packed_linear.json").read_text())["rows"]
    assert [(r["shape"], r["rows"]) for r in rows] == [("64x32", 1), ("64x32", 8)]
    assert all(r["plain_ms"] > 0 and r["packed_ms"] > 0 for r in rows)


def test_a_models_logits_are_compared_per_length(load_bench, monkeypatch, tmp_path, tiny_model_dir):
    bench = load_bench("packed_linear")
    argv = ["packed_linear.py", "--model", str(tiny_model_dir), "--lengths", "4,8"]
    monkeypatch.setattr(sys, "argv", [*argv, "--threads", "1", "--out", str(tmp_path)])
    bench.main()
    rows = json.loads((tmp_path / "packed_linear.json").read_text())["rows"]
    assert [r["tokens"] for r in rows] == [4, 8]
    for r in rows:  # the tiny model's LM head is packed; its logits stay at bf16 rounding
        assert 0 <= r["mean_abs"] <= r["max_abs"] < 0.1 and 0.9 <= r["top_agreement"] <= 1
