"""End-to-end training with a tiny random model and a real tokenizer, for every method."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mopd.config import METHODS, load_config, load_saved_config
from mopd.errors import RunFolderError
from mopd.models import packing
from mopd.models.packing import packing_available
from mopd.training.trainer import Trainer
from tasks_for_tests import tiny_run_overrides

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, model_dir: Path, method: str, *extra: str):
    overrides = [
        f"method={method}",
        *tiny_run_overrides(tmp_path, model_dir),
        f"logging.run_name={method}",
    ]
    if method == "opd":
        overrides += ["teacher.kind=external", f"teacher.external_model={model_dir}"]
    return load_config("demo", [*overrides, *extra])


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_changes_weights(tmp_path, tiny_model_dir, method):
    trainer = Trainer(_config(tmp_path, tiny_model_dir, method))
    before = _params(trainer.student)
    result = trainer.train()
    after = _params(trainer.student)
    assert len(result.history) == 2
    for row in result.history:
        assert math.isfinite(row["loss/total"]), row
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"{method}: no parameter changed"
    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "report.md", "rollouts.jsonl"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "latest").exists()
    assert [e["step"] for e in result.evals] == [0, 2]


def test_ema_teacher_moves_by_the_configured_rate_on_step_one(tmp_path, tiny_model_dir):
    rate = 0.25
    trainer = Trainer(
        _config(tmp_path, tiny_model_dir, "mopd", "train.steps=1", f"teacher.ema_rate={rate}")
    )
    theta0 = _params(trainer.student)
    trainer.train()
    theta1 = _params(trainer.student)
    teacher = dict(trainer.teacher.model.named_parameters())  # type: ignore[union-attr]
    moved = False
    for name, t0 in theta0.items():
        expected = t0 + rate * (theta1[name] - t0)
        torch.testing.assert_close(teacher[name].detach(), expected, rtol=0, atol=1e-6)
        moved |= not torch.equal(theta1[name], t0)
    assert moved


def test_bf16_ema_teacher_moves_by_the_rate_on_step_one(tmp_path, tiny_model_dir):
    rate = 0.05
    trainer = Trainer(
        _config(
            tmp_path, tiny_model_dir, "mopd", "train.steps=1", f"teacher.ema_rate={rate}",
            "model.dtype=bfloat16",
        )
    )  # fmt: skip
    theta0 = {k: v.double() for k, v in _params(trainer.student).items()}
    trainer.train()
    theta1 = {k: v.double() for k, v in _params(trainer.student).items()}
    exact = trainer.teacher.exact  # type: ignore[union-attr]
    moved = [k for k in theta0 if not torch.equal(theta0[k], theta1[k])]
    assert moved and set(exact) == set(moved)
    for name in moved:
        expected = theta0[name] + rate * (theta1[name] - theta0[name])
        torch.testing.assert_close(exact[name].double(), expected, rtol=1e-6, atol=1e-9)


def test_rollouts_without_context_get_no_loss(tmp_path, tiny_model_dir):
    # The base context (no peers) leaves every rollout without a teacher context.
    cfg = _config(
        tmp_path, tiny_model_dir, "mopd", "peers.n_success=0", "peers.n_failure=0", "train.steps=1"
    )
    trainer = Trainer(cfg)
    before = _params(trainer.student)
    result = trainer.train()
    row = result.history[0]
    assert row["teacher/context_fraction"] == 0.0
    assert row["loss/total"] == 0.0
    after = _params(trainer.student)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _comparable(rows: list[dict]) -> list[dict]:
    drop = ("time/", "perf/")
    return [{k: v for k, v in r.items() if not k.startswith(drop) and k != "time"} for r in rows]


@pytest.mark.skipif(not packing_available(), reason="this CPU/torch cannot pack bf16 weights")
def test_packed_weights_train_like_plain_ones(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(packing, "MIN_PACKED_ELEMENTS", 0)  # the tiny model's layers too
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or original(*a)
    )
    rows = {}
    for packed in (True, False):
        cfg = _config(
            tmp_path / str(packed), tiny_model_dir, "mopd", "train.steps=2",
            "model.dtype=bfloat16", f"model.packed_weights={packed}",
        )  # fmt: skip
        result = Trainer(cfg).train()
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        rows[packed] = _comparable([json.loads(line) for line in lines])
        if packed:
            assert calls  # rollouts and teacher passes ran on packed weights
            calls.clear()
    assert not calls
    # Same rollouts (decoding steps are a few rows: the same bf16 products); the losses
    # read longer teacher and student passes, equal up to bf16 rounding.
    assert [r.keys() for r in rows[True]] == [r.keys() for r in rows[False]]
    for packed, plain in zip(rows[True], rows[False], strict=True):
        for key, value in plain.items():
            if key in ("rollout/response_tokens_mean", "rollout/success_rate"):
                assert packed[key] == value, key
            else:
                assert packed[key] == pytest.approx(value, rel=2e-2, abs=1e-3), key


def test_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir):
    full = Trainer(_config(tmp_path / "a", tiny_model_dir, "mopd", "train.steps=4"))
    full_result = full.train()

    half = Trainer(_config(tmp_path / "b", tiny_model_dir, "mopd", "train.steps=2"))
    half.train()
    run_dir = half.run_dir
    resumed_cfg = load_saved_config(run_dir / "config.yaml", ["train.steps=4"])
    resumed = Trainer(resumed_cfg, run_dir=run_dir, resume=True)
    resumed_result = resumed.train()

    a = load_file(str(full_result.run_dir / "checkpoints/step-000004/student/model.safetensors"))
    b = load_file(str(resumed_result.run_dir / "checkpoints/step-000004/student/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    train_rows = lambda path: [  # noqa: E731
        r for r in map(json.loads, path.read_text().splitlines()) if "loss/total" in r
    ]
    rows_a = _comparable(train_rows(full_result.run_dir / "metrics.jsonl"))
    rows_b = _comparable(train_rows(run_dir / "metrics.jsonl"))
    # The interrupted run evaluated at its end (step 2); compare the training metrics.
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)


def test_resume_restores_the_ema_teacher(tmp_path, tiny_model_dir):
    trainer = Trainer(_config(tmp_path, tiny_model_dir, "mopd", "train.steps=1"))
    trainer.train()
    saved = {k: v.clone() for k, v in trainer.teacher.model.state_dict().items()}  # type: ignore[union-attr]
    again = Trainer(trainer.config, run_dir=trainer.run_dir, resume=True)
    restored = again.teacher.model.state_dict()  # type: ignore[union-attr]
    student = again.student.state_dict()
    differs_from_student = False
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
        differs_from_student |= not torch.equal(student[key], value)
    assert differs_from_student, "teacher equals the student: EMA state was not restored"


class _OffsetLogprobs:
    """An engine whose reported sampling log-probs are off by a constant."""

    def __init__(self, inner, offset: float) -> None:
        self.inner, self.offset = inner, offset

    def generate(self, prompts, *, n, params, seed):
        groups = self.inner.generate(prompts, n=n, params=params, seed=seed)
        shift = lambda r: replace(r, logprobs=tuple(x + self.offset for x in r.logprobs))  # noqa: E731
        return [[shift(r) for r in g] for g in groups]

    def update_weights(self, model) -> None:
        self.inner.update_weights(model)


@pytest.mark.parametrize("method", ["mopd", "grpo"])
def test_engine_logprob_mismatch_is_measured(tmp_path, tiny_model_dir, method):
    extra = ("train.steps=1", "rollout.temperature=0.7", "loss.is_clip=2.0")
    exact = Trainer(_config(tmp_path / "exact", tiny_model_dir, method, *extra))
    row = exact.train().history[0]
    # The transformers engine reports the tempered sampling log-probs it drew from.
    assert row["rollout/logprob_mismatch"] < 1e-4
    if method == "mopd":
        assert row["rollout/is_clipped_fraction"] == 0.0

    off = Trainer(_config(tmp_path / "off", tiny_model_dir, method, *extra))
    off.parts.engine = _OffsetLogprobs(off.parts.engine, -1.0)  # engine under-reports by 1 nat
    row = off.train().history[0]
    assert row["rollout/logprob_mismatch"] == pytest.approx(1.0, abs=1e-3)
    if method == "mopd":  # ratio e^1 > 2: every rescored token's weight is truncated
        assert row["rollout/is_clipped_fraction"] == 1.0


def test_second_training_on_a_run_folder_is_refused_before_its_model_loads(
    tmp_path, tiny_model_dir
):
    first = Trainer(_config(tmp_path, tiny_model_dir, "grpo"))
    missing = _config(tmp_path, tmp_path / "no-such-model", "grpo")  # same run folder
    with pytest.raises(RunFolderError, match="in use by another training"):
        Trainer(missing)
    first.train()  # releases the folder
    with pytest.raises(RunFolderError, match="no complete checkpoint"):
        Trainer(first.config, run_dir=tmp_path / "empty-run", resume=True)
    Trainer(first.config, run_dir=first.run_dir, resume=True)  # free again


def test_resume_drops_rollout_rows_of_steps_after_the_checkpoint(tmp_path, tiny_model_dir):
    cfg = _config(
        tmp_path, tiny_model_dir, "mopd", "train.checkpoint_every=1", "train.keep_checkpoints=2"
    )
    run = Trainer(cfg).train().run_dir
    samples = run / "rollouts.jsonl"
    steps = lambda: [json.loads(line)["step"] for line in samples.read_text().splitlines()]  # noqa: E731
    before = steps()
    # A run killed after logging step 2 but before saving it: step 1 is the newest checkpoint.
    ckpts = run / "checkpoints"
    (ckpts / "step-000002" / "COMPLETE").unlink()
    (ckpts / "latest").write_text("step-000001")
    leftover = ckpts / ".tmp-step-000002-999"
    leftover.mkdir()
    Trainer(cfg, run_dir=run, resume=True).train()
    assert steps() == before and set(before) == {1, 2}
    assert not leftover.exists()
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000001", "step-000002"]


def test_checkpoint_files_are_readable_like_the_rest_of_the_run(tmp_path, tiny_model_dir):
    run = Trainer(_config(tmp_path, tiny_model_dir, "grpo")).train().run_dir
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    config_mode = modes["config.yaml"]
    odd = {name: oct(mode) for name, mode in modes.items() if mode != config_mode}
    assert not odd, odd


def test_progress_shows_each_evaluation_score_when_it_lands(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "grpo", "logging.progress=true", "eval.every=1")
    Trainer(cfg).train()
    err = capsys.readouterr().err
    for step in (0, 1, 2):
        assert f"eval at step {step}: mean@2 " in err, err


def test_eval_at_start_false_skips_the_evaluation_before_training(tmp_path, tiny_model_dir):
    from mopd.training.trainer import final_summary

    result = Trainer(_config(tmp_path, tiny_model_dir, "grpo", "eval.at_start=false")).train()
    assert [e["step"] for e in result.evals] == [2]  # the last step's evaluation only
    rows = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if "eval/mean@2" in r] == [2]
    mean = next(line for line in final_summary(result).splitlines() if "mean@2" in line)
    assert mean.split()[1] == "n/a"  # nothing measured before training


def test_a_fresh_run_in_a_folder_with_checkpoints_is_refused(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "grpo")
    Trainer(cfg).train()
    with pytest.raises(RunFolderError, match="holds checkpoints of an earlier training"):
        Trainer(cfg)


def test_a_failed_start_leaves_no_folder_and_no_lock(tmp_path, tiny_model_dir):
    from mopd.errors import ModelNotFoundError

    missing = _config(tmp_path, tmp_path / "no-such-model", "grpo")
    with pytest.raises(ModelNotFoundError):
        Trainer(missing)
    assert not (tmp_path / "grpo").exists()
    Trainer(_config(tmp_path, tiny_model_dir, "grpo"))  # same folder, same process: free
