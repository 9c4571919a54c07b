"""The command line: errors before any model loads, help, a tiny end-to-end run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mopd.cli import main


@pytest.mark.unit
def test_unknown_key_fails_before_loading_with_a_suggestion(capsys):
    assert main(["train", "rollout.tempeature=0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'rollout.tempeature'" in err and "rollout.temperature" in err


@pytest.mark.unit
def test_bad_override_syntax_is_explained(capsys):
    assert main(["train", "rollout.n"]) == 2
    assert "key=value" in capsys.readouterr().err


@pytest.mark.unit
def test_help_shows_the_chosen_recipe_and_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--config", "grpo", "optim.lr=3e-5", "--help"])
    out = capsys.readouterr().out
    assert 'loss.kind = "grpo"' in out and "optim.lr = 3e-05" in out
    with pytest.raises(SystemExit):
        main(["train", "--config=grpo", "--help"])
    assert 'loss.kind = "grpo"' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # bad input: still help, with the demo's values
        main(["train", "task.options=3", "--help"])
    assert exc.value.code == 0 and "recipe demo (" in capsys.readouterr().out


@pytest.mark.unit
def test_help_lists_keys_with_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "peers.n_success = 2" in out and "methods:" in out
    # The values plain `mopd train` will use (the demo recipe), each key with its help.
    assert "with the values of recipe demo" in out
    assert re.search(r"train\.steps = 10 +optimizer steps", out)
    assert re.search(r"optim\.lr = 2e-05 +AdamW learning rate", out)
    assert (
        "objectives: contrastive-credit, distill, distill-failures, dpo, grpo, grpo+distill" in out
    )


def _table(out: str) -> dict[str, tuple[str, str]]:
    """metric -> (before, after) of the summary table `mopd train` prints."""
    import re

    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    return {r[0]: (r[1], r[2]) for r in rows if len(r) == 3 and r[0] != "metric"}


@pytest.mark.integration
def test_train_then_resume_then_eval_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    common = [
        f"model.name={tiny_model_dir}",
        "task.name=tasks_for_tests:make_parity_task",
        "rollout.n=2",
        "rollout.max_new_tokens=4",
        "train.prompts_per_step=1",
        "eval.k=2",
        f"logging.output_dir={tmp_path}",
        "logging.run_name=cli",
        "logging.progress=false",
    ]
    assert main(["train", "train.steps=1", *common]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out
    run = tmp_path / "cli"
    before = _table(out)["mean@2"][0]
    assert main(["train", "--resume", str(run), "train.steps=2"]) == 0
    resumed = _table(capsys.readouterr().out)
    assert resumed["mean@2"][0] == before  # the first evaluation of the run, not the resume's
    assert (run / "checkpoints" / "step-000002" / "student" / "config.json").exists()
    student = run / "checkpoints" / "step-000002" / "student"
    code = main(
        [
            "eval",
            "--model",
            str(student),
            "--task",
            "tasks_for_tests:make_parity_task",
            "--k",
            "2",
            "--max-new-tokens",
            "4",
            "--output",
            str(tmp_path / "eval.json"),
        ]
    )
    assert code == 0
    assert "eval/mean@2" in (tmp_path / "eval.json").read_text()
    capsys.readouterr()
    # --run takes the run's own evaluation settings: the in-training score reproduces.
    samples = tmp_path / "samples.jsonl"
    samples.write_text("from an earlier evaluation\n")
    args = ["eval", "--run", str(run), "--output", str(tmp_path / "run.json")]
    assert main([*args, "--samples", str(samples)]) == 0
    err = capsys.readouterr().err
    assert "k=2" in err and "max_new_tokens=4" in err and f"{run / 'config.yaml'}" in err
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval/mean@2" in r][-1]
    result = json.loads((tmp_path / "run.json").read_text())["results"]
    assert [r["step"] for r in result] == [2]
    assert result[0]["metrics"]["eval/mean@2"] == last["eval/mean@2"]
    # Every sample, one line per prompt; the file is replaced, not appended to.
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert {(r["step"], r["task"]) for r in lines} == {(2, "tasks_for_tests:make_parity_task")}
    assert all(
        len(r["texts"]) == len(r["rewards"]) == len(r["response_tokens"]) == 2 for r in lines
    )
    rewards = [x for r in lines for x in r["rewards"]]
    assert sum(rewards) / len(rewards) == pytest.approx(last["eval/mean@2"])


def _no_model_loads(monkeypatch) -> None:
    """Fail the test if anything tries to load a model or tokenizer."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input error was reported")

    monkeypatch.setattr("mopd.models.loading.load_model", refuse)
    monkeypatch.setattr("mopd.models.loading.load_tokenizer", refuse)
    monkeypatch.setattr("mopd.training.build.load_model", refuse)
    monkeypatch.setattr("mopd.training.build.load_tokenizer", refuse)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task.name=math", "task.options.data=algebra.jsonl"], "algebra.jsonl: no such data file"),
        (["task.options.digit=2"], "has no option 'digit'"),
        (["task.name=nope"], "unknown task 'nope'"),
        (["task.name=code", "task.options.data=BAD"], "field 'tests'"),
    ],
)
def test_task_option_and_data_errors_are_one_line_before_any_model_loads(
    tmp_path, monkeypatch, capsys, overrides, expected
):
    _no_model_loads(monkeypatch)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "p", "question": "double it"}\n')  # no "tests" field
    overrides = [o.replace("BAD", str(bad)) for o in overrides]
    monkeypatch.chdir(tmp_path)
    code = main(["train", f"logging.output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mopd: error: ") and expected in err[0], err


@pytest.mark.integration
def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_prints_the_resume_command(
    tmp_path, tiny_model_dir
):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tasks_for_tests import tiny_run_overrides

    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    overrides = [*tiny_run_overrides(tmp_path, tiny_model_dir), "train.steps=50"]
    overrides += ["logging.run_name=stopped", "rollout.max_new_tokens=4", "eval.k=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mopd.cli", "train", *overrides],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"loss/total"' in metrics.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "no training step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"mopd train --resume {tmp_path / 'stopped'}" in err and "Traceback" not in err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    last = max(steps)
    assert 1 <= last < 50
    latest = (tmp_path / "stopped" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{last:06d}"


@pytest.mark.unit
def test_eval_of_a_missing_run_folder_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "runs/nope", "--max-prompts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mopd: error: model folder 'runs/nope' does not exist"]


@pytest.mark.unit
def test_a_data_task_without_eval_problems_or_rows_is_refused_before_loading(
    tmp_path, monkeypatch, capsys
):
    _no_model_loads(monkeypatch)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"question": "1+{i}?", "answer": "{i + 1}"}}\n' for i in range(5)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (
            [f"task.options.data={rows}"],
            "has no eval problems: hold some out, e.g. task.options.n_eval=20",
        ),
        ([f"task.options.data={empty}"], "empty.jsonl: the data file holds no rows"),
    ]
    for overrides, expected in cases:
        code = main(["train", "task.name=math", f"logging.output_dir={tmp_path}", *overrides])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.unit
def test_resume_without_a_checkpoint_is_one_line_before_any_model_loads(
    tmp_path, monkeypatch, capsys
):
    _no_model_loads(monkeypatch)
    from mopd.config import load_config, save_config

    run = tmp_path / "crashed"
    run.mkdir()  # a run killed during its first save: its config, no checkpoint
    save_config(load_config("demo", [f"logging.output_dir={tmp_path}"]), run / "config.yaml")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no complete checkpoint in it" in err[0], err
    assert f"mopd train --config {run / 'config.yaml'}" in err[0]


@pytest.mark.integration
def test_a_tokenizer_without_chat_template_is_one_line_before_the_model_loads(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    import shutil

    plain = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, plain)
    config = plain / "tokenizer_config.json"
    import json

    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    monkeypatch.setattr("mopd.training.build.load_model", _refuse)
    code = main(["train", f"model.name={plain}", f"logging.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "has no chat template: use an instruct/chat model" in err[0]


def _refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the tokenizer was checked")


@pytest.mark.unit
def test_an_interrupt_outside_the_training_loop_is_one_line_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("mopd.cli._report", interrupted)
    assert main(["report", "somewhere"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mopd: interrupted (work since the last checkpoint is lost)"]


@pytest.mark.integration
def test_eval_of_a_lora_run_evaluates_each_adapter_as_trained(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("peft")
    import json

    from tasks_for_tests import tiny_run_overrides

    lora = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.target_modules=[q_proj,v_proj]"]
    overrides = [*tiny_run_overrides(tmp_path, tiny_model_dir), *lora, "logging.run_name=lora"]
    extra = ["eval.every=1", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    assert main(["train", *overrides, *extra, "model.dtype=bfloat16", "optim.lr=5e-2"]) == 0
    run = tmp_path / "lora"
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--output", str(tmp_path / "run.json")]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = {r["step"]: r["eval/mean@2"] for r in rows if "eval/mean@2" in r}
    results = json.loads((tmp_path / "run.json").read_text())["results"]
    # Both checkpoints, the periodic one (adapter only) too, on the run's own base model:
    # each reproduces the in-training evaluation of that step.
    assert [(r["step"], Path(r["model"]).name) for r in results] == [(1, "adapter"), (2, "adapter")]
    assert {r["step"]: r["metrics"]["eval/mean@2"] for r in results} == {
        s: trained[s] for s in (1, 2)
    }
    # An adapter folder given as --model loads on the base it names.
    assert main(["eval", "--model", results[1]["model"], "--task", "tasks_for_tests:make_parity_task",
                 "--k", "2", "--max-new-tokens", "8", "--dtype", "bfloat16"]) == 0  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"base_model_name_or_path": "/nowhere/base"}', "its base model '/nowhere/base'"),
        ("{not json", "is not a readable adapter config"),
    ],
)
def test_an_adapter_with_a_missing_base_or_a_broken_config_is_one_line(
    tmp_path, monkeypatch, capsys, config, message
):
    _no_model_loads(monkeypatch)
    (tmp_path / "adapter_config.json").write_text(config)
    assert main(["eval", "--model", str(tmp_path), "--max-prompts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
