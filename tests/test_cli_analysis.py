"""`mopd eval`, `mopd analyze` and `mopd report` end to end on a tiny random model."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from mopd.cli import main

pytestmark = pytest.mark.integration

PARITY = "tasks_for_tests:make_parity_task"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("runs")
    args = [
        "train",
        f"model.name={tiny_model_dir}",
        f"task.name={PARITY}",
        "rollout.n=4",
        "rollout.max_new_tokens=5",
        "train.prompts_per_step=2",
        "train.steps=2",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
        "train.save_all_rollouts=true",
        "eval.k=2",
        "eval.every=1",
        f"logging.output_dir={out}",
        "logging.run_name=run",
        "logging.progress=false",
    ]
    assert main(args) == 0
    return out / "run"


def test_full_rollout_records_hold_ids_messages_and_peers(run_dir):
    records = [
        json.loads(line) for line in (run_dir / "rollouts_full.jsonl").read_text().splitlines()
    ]
    assert len(records) == 2 * 2 * 4  # steps x prompts x rollouts
    first = records[0]
    assert first["messages"][0]["role"] == "user" and first["response_ids"]
    assert {"successes", "failures", "teacher_prompt_tokens", "feedback"} <= first.keys()
    # Rollouts the teacher scored carry their score; those without a context carry none.
    for record in records:
        if record["has_context"]:
            assert record["teacher_score"] < 0.0  # a mean log-prob
        else:
            assert record["teacher_score"] is None
    assert any(r["has_context"] for r in records)


def test_training_logs_eval_cis_and_diversity(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/mean@2" in r]
    assert len(evals) == 3  # before training and after each of the 2 steps
    for row in evals:
        assert row["eval/ci_low/mean@2"] <= row["eval/mean@2"] <= row["eval/ci_high/mean@2"]
        assert 0.0 <= row["eval/unique_ratio"] <= 1.0


def test_analyze_samples_scores_every_condition_and_writes_outputs(
    tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "analysis"
    code = main(
        [
            "analyze",
            "--model",
            str(tiny_model_dir),
            "--task",
            PARITY,
            "--n",
            "4",
            "--max-prompts",
            "3",
            "--max-new-tokens",
            "6",
            "--n-boot",
            "50",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "analysis.json").read_text())
    expected = ["base", "1S", "2S", "1F", "1S1F", "2S1F", "random_peer", "unrelated_prompt"]
    assert list(summary["conditions"]) == expected
    assert summary["conditions"]["base"]["built_fraction"] == 1.0
    for cond in summary["conditions"].values():
        auc = cond["metrics"]["both_present"]["success_auc"]
        assert auc["n"] == summary["n_both_present"]
        assert 0.0 <= cond["built_fraction"] <= 1.0 and cond["prompt_tokens_mean"] > 0
    scores = (out / "scores.jsonl").read_text().splitlines()
    assert len(scores) == len(expected) * 3 * 4
    assert "success_auc" in (out / "analysis.md").read_text()
    assert "2S1F" in capsys.readouterr().out
    if summary["n_both_present"]:
        assert Image.open(out / "signal_auc.png").size[0] > 500


def test_analyze_reads_a_runs_rollout_file(run_dir, tmp_path):
    out = tmp_path / "from-file"
    code = main(
        [
            "analyze",
            "--model",
            str(run_dir / "checkpoints/step-000002/student"),
            "--rollouts",
            str(run_dir / "rollouts_full.jsonl"),
            "--conditions",
            "base,2S1F",
            "--n-boot",
            "20",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["n_prompts"] == 4 and summary["group_sizes"] == [4]


def test_analyze_rejects_an_unknown_condition_before_loading(capsys):
    assert main(["analyze", "--model", "nowhere", "--conditions", "base,3S"]) == 2
    assert "3S" in capsys.readouterr().err


def test_analyze_rejects_an_unknown_layout_before_loading(capsys):
    assert main(["analyze", "--model", "nowhere", "--layouts", "paper,chat"]) == 2
    assert "--layouts" in capsys.readouterr().err


def test_analyze_scores_conditions_in_several_layouts(tiny_model_dir, tmp_path):
    out = tmp_path / "layouts"
    args = ["analyze", "--model", str(tiny_model_dir), "--task", PARITY, "--n", "4"]
    args += ["--max-prompts", "2", "--max-new-tokens", "4", "--n-boot", "20"]
    args += ["--conditions", "base,2S1F", "--layouts", "paper,multi-turn", "--output-dir", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "analysis.json").read_text())
    assert list(summary["conditions"]) == ["base", "2S1F", "2S1F@multi-turn"]
    assert summary["layouts"] == ["paper", "multi-turn"]
    for cond in summary["conditions"].values():
        assert {"p_eot_teacher", "p_eot_student", "entropy_gap", "gap_success"} <= set(cond)
    assert "P(eot) teacher" in (out / "analysis.md").read_text()


def test_eval_of_every_checkpoint_reports_pass_at_each_k(run_dir, tmp_path):
    output = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--run",
            str(run_dir),
            "--task",
            PARITY,
            "--k",
            "3",
            "--max-new-tokens",
            "4",
            "--n-boot",
            "50",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    payload = json.loads(output.read_text())
    assert [r["step"] for r in payload["results"]] == [1, 2]
    metrics = payload["results"][0]["tasks"][PARITY]["metrics"]
    assert set(metrics) == {"mean@3", "pass@1", "pass@2", "pass@3"}
    assert metrics["pass@1"]["mean"] <= metrics["pass@2"]["mean"] <= metrics["pass@3"]["mean"]
    assert metrics["pass@1"]["mean"] == pytest.approx(metrics["mean@3"]["mean"])  # 0/1 rewards
    assert "pass@2" in output.with_suffix(".md").read_text()


def test_eval_without_a_model_is_a_config_error(capsys):
    assert main(["eval"]) == 2
    assert "--model" in capsys.readouterr().err


def test_report_compares_runs(run_dir, tmp_path):
    other = tmp_path / "other" / "run"
    other.mkdir(parents=True)
    for name in ("metrics.jsonl", "config.yaml"):
        shutil.copy(run_dir / name, other / name)
    out = tmp_path / "compare"
    assert main(["report", str(run_dir), str(other), "--output", str(out)]) == 0
    page = (out / "compare.md").read_text()
    assert "## Final evaluation" in page and "[" in page
    for name in ("compare_eval.png", "compare_training.png", "compare_diversity.png"):
        assert f"]({name})" in page
        assert Image.open(out / name).size[0] >= 1000
