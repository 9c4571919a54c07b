"""Comparison page: files, final table with intervals, panels only for logged metrics."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mopd.evaluation.signal import MetricSummary
from mopd.reporting.compare import signal_png, write_comparison

pytestmark = pytest.mark.unit


def _write_run(path, rows, method="mopd"):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (path / "config.yaml").write_text(f"method: {method}\ntask:\n  name: arithmetic\n")


def _eval_row(step, mean, low, high):
    return {
        "step": step,
        "eval/mean@4": mean,
        "eval/pass@1": mean,
        "eval/pass@4": min(1.0, 2 * mean),
        "eval/ci_low/mean@4": low,
        "eval/ci_high/mean@4": high,
        "eval/self_bleu": 0.25,
        "eval/distinct_2": 0.5,
    }


def test_final_table_shows_last_eval_with_interval_and_every_figure(tmp_path):
    a = [_eval_row(0, 0.2, 0.1, 0.3)]
    a += [{"step": s, "rollout/reward_mean": 0.1 * s, "time/step": 2.0} for s in (1, 2)]
    a.append(_eval_row(2, 0.4, 0.3, 0.5))
    _write_run(tmp_path / "a", a)
    _write_run(tmp_path / "b", [_eval_row(0, 0.3, 0.2, 0.4)], method="grpo")
    page = write_comparison([tmp_path / "a", tmp_path / "b"], tmp_path / "out").read_text()
    assert "| a | 2 | 4 | 0.400 [0.300, 0.500] | 0.400 | 0.800 | 0.250 | 2.00 |" in page
    assert "| b | 0 | 4 | 0.300 [0.200, 0.400] |" in page
    assert "| b | grpo | arithmetic |" in page
    for name in ("compare_eval.png", "compare_training.png", "compare_diversity.png"):
        assert Image.open(tmp_path / "out" / name).size[0] > 600


def test_figures_without_data_are_left_out(tmp_path):
    _write_run(tmp_path / "a", [{"step": 1, "rollout/reward_mean": 0.5}])
    out = tmp_path / "out"
    (out).mkdir()
    (out / "compare_eval.png").write_bytes(b"stale")
    page = write_comparison([tmp_path / "a"], out).read_text()
    assert "compare_training.png" in page and "compare_eval.png" not in page
    assert not (out / "compare_eval.png").exists()
    assert "| a | n/a | n/a | n/a | n/a | n/a |" in page


def test_missing_run_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        write_comparison([tmp_path / "nope"], tmp_path / "out")


def test_signal_chart_skips_undefined_conditions():
    undefined = MetricSummary(float("nan"), float("nan"), float("nan"), 0)
    assert signal_png([("base", undefined)], title="t") is None
    png = signal_png([("base", undefined), ("2S1F", MetricSummary(0.7, 0.6, 0.8, 5))], title="t")
    assert png is not None and png.startswith(b"\x89PNG")
