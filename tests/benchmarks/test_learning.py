"""The learning benchmark's planning, split and statistics (no training here)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture
def learning(tmp_path, monkeypatch, load_bench):
    module = load_bench("learning")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


def _write(module, method: str, lr: float, seed: int, final: float) -> None:
    run = module.Run("add1", method, lr, seed)
    run.record.parent.mkdir(parents=True, exist_ok=True)
    run.record.write_text(json.dumps({"validation": [{"step": 8, "mean@4": final}]}))


def test_validation_and_test_splits_are_disjoint_from_each_other_and_training(load_bench):
    tasks = load_bench("bench_tasks")
    val = tasks.make_arithmetic("validation", n_validation=5, n_test=7, n_train=20)
    test = tasks.make_arithmetic("test", n_validation=5, n_test=7, n_train=20)
    ids = lambda problems: {p.id for p in problems}  # noqa: E731
    assert len(val.eval_problems()) == 5 and len(test.eval_problems()) == 7
    assert not ids(val.eval_problems()) & ids(test.eval_problems())
    assert not ids(val.train_problems()) & (ids(val.eval_problems()) | ids(test.eval_problems()))
    with pytest.raises(ValueError, match="split"):
        tasks.make_arithmetic("train")


def test_main_runs_are_planned_only_after_the_search_and_use_the_best_rate(learning):
    before = learning.plan("add1")
    assert {r.method for r in before} == {"grpo", "mopd-2s1f", "base"}
    for lr, score in zip(learning.LR_GRID, (0.5, 0.7, 0.6), strict=True):
        _write(learning, "mopd-2s1f", lr, 0, score)
    for lr, score in zip(learning.LR_GRID, (0.4, 0.4, 0.3), strict=True):
        _write(learning, "grpo", lr, 0, score)
    after = learning.plan("add1")
    best_mopd, best_grpo = learning.LR_GRID[1], learning.LR_GRID[0]  # grpo tie: smaller lr
    assert {r.lr for r in after if r.method in ("sdpo", "mopd-2s", "random_peer")} == {best_mopd}
    assert {r.lr for r in after if r.method == "grpo" and r.seed > 0} == {best_grpo}
    assert len(after) == len(set(after))  # the seed-0 search run is not planned twice


def test_status_filters_by_method_and_seed_and_rejects_unknown_names(learning, capsys):
    assert learning.main(["status", "--setting", "add1", "--methods", "grpo,base"]) == 0
    listed = capsys.readouterr().out.split()
    assert [n for n in listed if n.startswith(("grpo", "mopd", "base"))] == [
        "grpo-lr5e-06-s0",
        "grpo-lr2e-05-s0",
        "grpo-lr8e-05-s0",
        "base-lr0-s0",
        "base-lr0-s1",
        "base-lr0-s2",
    ]
    assert learning.main(["status", "--methods", "base", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.split()[-1:] == ["base-lr0-s1"]
    assert "base-lr0-s0" not in out
    with pytest.raises(SystemExit):
        learning.main(["run", "--setting", "add1", "--methods", "grpo,nope"])
    assert "unknown method(s) ['nope']" in capsys.readouterr().err


def test_mean_ci_is_a_t_interval_over_seeds(learning):
    mean, half = learning.mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert math.isnan(learning.mean_ci([0.4])[1])
