"""The registry is the only place a loss kind is named: adding one needs nothing else."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from mopd.config import ConfigError, load_config
from mopd.core.losses import aggregate
from mopd.objectives import REGISTRY, Objective, Scorers, StepBatch, StepLog, StudentForward
from mopd.training.trainer import Trainer
from tasks_for_tests import tiny_run_overrides


class RewardWeightedNll(Objective):
    """A toy objective: NLL of every rollout, weighted by its reward (token mean)."""

    name = "toy-rwr"
    min_group_size = 3
    reports = ("toy/weight",)

    def rows(self, batch: StepBatch):
        return [r for r in batch.rows if r.reward > 0]

    def normalisers(self, batch: StepBatch) -> dict[str, float]:
        return {"tokens": sum(r.tokens for r in self.rows(batch))}

    def loss(
        self, forward: StudentForward, norms: Mapping[str, float], scorers: Scorers, log: StepLog
    ) -> torch.Tensor:
        reward_B1 = forward.logprobs().new_tensor([[r.reward] for r in forward.rows])
        per_tok_BR = -reward_B1 * forward.logprobs()
        loss = aggregate(per_tok_BR, forward.mask_BR, "token-mean", denominator=norms["tokens"])
        log.losses[self.name] += float(loss.detach())
        log.add_ratio("toy/weight", float(reward_B1.sum()), len(forward.rows))
        return loss


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, RewardWeightedNll.name, RewardWeightedNll)


def test_an_objective_added_to_the_registry_trains_two_steps(
    tmp_path, tiny_model_dir, toy_registered
):
    overrides = [*tiny_run_overrides(tmp_path, tiny_model_dir), "method=grpo", "loss.kind=toy-rwr"]
    trainer = Trainer(load_config("demo", overrides))
    assert trainer.teacher is None  # the toy needs no teacher: none is built
    before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    result = trainer.train()
    assert len(result.history) == 2
    for row in result.history:
        assert math.isfinite(row["loss/toy-rwr"]) and row["loss/total"] == row["loss/toy-rwr"]
        assert row["toy/weight"] == 1.0 or math.isnan(row["toy/weight"])
    after = dict(trainer.student.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_config_validation_asks_the_registry(toy_registered):
    with pytest.raises(ConfigError, match=r"rollout\.n: loss\.kind=toy-rwr .* rollout\.n >= 3"):
        load_config(None, ["loss.kind=toy-rwr", "rollout.n=2"])
    assert load_config(None, ["loss.kind=toy-rwr"]).loss.kind == "toy-rwr"


def test_an_unregistered_kind_names_the_registered_ones():
    with pytest.raises(
        ConfigError, match=r"loss\.kind: got 'nope', expected one of .*'grpo\+distill'"
    ):
        load_config(None, ["loss.kind=nope"])


def test_the_readme_example_objective_trains(tmp_path, tiny_model_dir, monkeypatch):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Extending: a new objective", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr("mopd.objectives.REGISTRY", dict(REGISTRY))  # the example registers
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    overrides = [*tiny_run_overrides(tmp_path, tiny_model_dir), "loss.kind=rwr", "train.steps=1"]
    result = Trainer(load_config("demo", overrides)).train()
    assert math.isfinite(result.history[0]["loss/rwr"])


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_registered_objective_trains_two_steps(tmp_path, tiny_model_dir, kind):
    overrides = [*tiny_run_overrides(tmp_path, tiny_model_dir), "method=mopd", f"loss.kind={kind}"]
    overrides += ["loss.grpo_mix=0.5"] if kind == "grpo+distill" else []
    trainer = Trainer(load_config("demo", overrides))
    before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    history = trainer.train().history
    assert all(math.isfinite(row["loss/total"]) for row in history)
    after = dict(trainer.student.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before), kind
