"""Objectives on real sampled groups of a tiny model: the gradients they produce."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_model
from mopd.collect.shards import sample_local_shards
from mopd.config import load_config
from mopd.models.teachers import ExternalTeacher
from mopd.objectives import REGISTRY, Scorers, StepBatch, StepLog, assemble_batch, build_objective
from mopd.rollout.hf import HFRolloutEngine
from mopd.training.step import run_objective
from tasks_for_tests import ParityTask

pytestmark = pytest.mark.integration


def _config(*extra: str):
    return load_config(
        None,
        [
            "method=mopd",
            "rollout.n=4",
            "rollout.max_new_tokens=6",
            "rollout.temperature=0.7",
            "train.prompts_per_step=3",
            "train.micro_batch_size=5",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def setting(tokenizer):
    """A student, a different teacher, and one step's verified groups with peer contexts."""
    student = make_tiny_model(tokenizer, seed=0)
    teacher = ExternalTeacher(make_tiny_model(tokenizer, seed=1))
    cfg = _config()
    task = ParityTask()
    engine = HFRolloutEngine(student, tokenizer, batch_size=64)
    sampled = sample_local_shards(
        cfg, engine, tokenizer, task, task.train_problems()[:3], seed=5, teacher_inputs=True,
        contrast=True,
    )  # fmt: skip
    batch = assemble_batch(
        sampled.prompt_ids,
        sampled.groups,
        sampled.verdicts,
        sampled.teacher_inputs,
        success_threshold=1.0,
        normalize_std=False,
    )
    assert batch.with_context and any(r.advantage != 0 for r in batch.rows), "need signal"
    return student, teacher, tokenizer, batch


def _gradient(setting, *overrides: str) -> tuple[torch.Tensor, dict[str, float]]:
    """Flat student gradient of one step's objective (single process) and its loss terms."""
    student, teacher, tokenizer, batch = setting
    student = copy.deepcopy(student)
    objective = build_objective(_config(*overrides))
    norms = objective.normalisers(batch)
    scorers = Scorers(student, tokenizer.pad_token_id, teacher=teacher)
    student.train()
    log = run_objective(objective, batch, norms, scorers, temperature=0.7, is_clip=None)
    grads = [p.grad.flatten() for p in student.parameters() if p.grad is not None]
    return torch.cat(grads), log.losses


@pytest.mark.parametrize("lam", [0.25, 1.0])
def test_grpo_distill_mix_is_the_weighted_sum_of_the_pure_objectives(setting, lam):
    g_grpo, l_grpo = _gradient(setting, "loss.kind=grpo")
    g_distill, l_distill = _gradient(setting, "loss.kind=distill")
    g_mix, l_mix = _gradient(setting, "loss.kind=grpo+distill", f"loss.grpo_mix={lam}")
    assert g_grpo.abs().max() > 0 and g_distill.abs().max() > 0
    expected = (1 - lam) * g_grpo + lam * g_distill
    torch.testing.assert_close(g_mix, expected, rtol=1e-4, atol=1e-7)
    # Each term is logged unweighted, as the pure objective logs it.
    assert l_mix["grpo"] == pytest.approx(l_grpo["grpo"], rel=1e-5, abs=1e-9)
    assert l_mix["distill"] == pytest.approx(l_distill["distill"], rel=1e-5)


def test_distillation_trains_only_rows_with_a_context(setting):
    *_, batch = setting
    objective = build_objective(_config())
    trained = [r for chunk in objective.micro_batches(batch, {"distill/rows": 1}) for r in chunk]
    assert trained == batch.with_context
    norms = objective.normalisers(batch)
    assert norms["distill"] == sum(len(r.rollout.response_ids) for r in batch.with_context)


def test_grpo_forwards_rows_with_an_advantage_but_counts_every_rollout(setting):
    *_, batch = setting
    objective = build_objective(_config("method=grpo"))
    trained = [r for chunk in objective.micro_batches(batch, {"grpo": 1}) for r in chunk]
    assert trained == [r for r in batch.rows if r.advantage != 0]
    assert objective.normalisers(batch)["grpo"] == sum(
        len(r.rollout.response_ids) for r in batch.rows
    )


def test_preference_objectives_take_one_group_with_pairs_per_micro_batch(setting):
    *_, batch = setting
    objective = build_objective(_config("method=simpo"))
    chunks = objective.micro_batches(batch, {"pairs": 1})
    mixed = [g for g in batch.groups if len({r.reward for r in g}) == 2]
    assert chunks == mixed
    n_pairs = sum(sum(r.success for r in g) * sum(not r.success for r in g) for g in mixed)
    assert objective.normalisers(batch)["pairs"] == n_pairs


def test_every_registered_objective_declares_its_needs():
    for kind, cls in REGISTRY.items():
        assert cls.name == kind
        assert cls.min_group_size >= 1
    assert REGISTRY["distill"].needs_teacher and REGISTRY["grpo+distill"].needs_teacher
    assert REGISTRY["dpo"].needs_reference and not REGISTRY["simpo"].needs_reference
    assert not StepBatch((), 0).groups


def test_distillation_runs_at_the_rollout_temperature_unless_set(setting):
    from mopd.core.losses import aggregate, topk_divergence
    from mopd.objectives import StudentForward
    from mopd.objectives.distill import loss_temperature

    assert loss_temperature(_config()) == 0.7
    assert loss_temperature(_config("loss.temperature=1.0")) == 1.0
    student, teacher, tokenizer, batch = setting
    rows = batch.with_context[:4]
    for temp in (0.7, 1.0):
        objective = build_objective(_config(f"loss.temperature={temp}"))
        norms = objective.normalisers(batch)
        scorers = Scorers(student, tokenizer.pad_token_id, teacher=teacher)
        forward = StudentForward.run(rows, scorers, objective.teacher_requests(rows))
        got = objective.loss(forward, norms, scorers, StepLog(losses={"distill": 0.0}))
        # Independently: both sides' logits divided by T, then the paper's divergence.
        s, t = forward.logits_BRV.detach() / temp, forward.teacher_BRV / temp
        per_tok = topk_divergence(s, t, k=100, alpha=0.5, add_tail=True)
        expected = aggregate(per_tok, forward.mask_BR, "token-mean", denominator=norms["distill"])
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "overrides",
    [
        ("loss.kind=signed-credit", "loss.credit_clip=0"),
        ("loss.kind=contrastive-credit", "loss.contrast_scale=0"),
    ],
)
def test_credit_objectives_without_credit_are_grpo(setting, overrides):
    g_grpo, l_grpo = _gradient(setting, "loss.kind=grpo")
    g_credit, l_credit = _gradient(setting, *overrides)
    torch.testing.assert_close(g_credit, g_grpo, rtol=1e-5, atol=1e-8)
    kind = overrides[0].split("=")[1]
    assert l_credit[kind] == pytest.approx(l_grpo["grpo"], rel=1e-5, abs=1e-9)


def test_credit_advantages_keep_the_verifiers_sign_and_use_the_teacher(setting):
    from mopd.objectives import StudentForward

    student, teacher, tokenizer, batch = setting
    scorers = Scorers(student, tokenizer.pad_token_id, teacher=teacher)
    for kind in ("signed-credit", "contrastive-credit"):
        objective = build_objective(_config(f"loss.kind={kind}"))
        rows = objective.rows(batch)
        requests = objective.teacher_requests(rows)
        assert requests, kind
        forward = StudentForward.run(rows, scorers, requests)
        log = StepLog()
        adv_BR = objective.token_advantages(forward, log)  # type: ignore[attr-defined]
        adv_B1 = torch.tensor([[r.advantage] for r in rows])
        if kind == "signed-credit":  # its teacher forward also gives the signal metrics
            scored = {(rows[i].group, rows[i].index) for i, _ in requests}
            assert set(log.teacher_scores) == scored
            assert all(score < 0 for score in log.teacher_scores.values())
            num, den = log.ratios["credit/clipped_fraction"]
            assert den == int(((forward.mask_BR != 0) & (adv_B1 != 0)).sum()) and 0 <= num <= den
        valid = forward.mask_BR != 0
        assert ((adv_BR * adv_B1)[valid] >= 0).all(), kind  # never the opposite sign
        assert not torch.allclose(adv_BR[valid], adv_B1.expand_as(adv_BR)[valid]), kind
        if kind == "contrastive-credit":  # two prompts per contrasted row, one teacher call
            assert [i for i, _ in requests][0::2] == [i for i, _ in requests][1::2]


def test_distill_failures_trains_failed_rows_with_a_context_only(setting):
    *_, batch = setting
    objective = build_objective(_config("loss.kind=distill-failures"))
    trained = [r for chunk in objective.micro_batches(batch, {"distill/rows": 1}) for r in chunk]
    assert trained and all(not r.success and r.has_context for r in trained)
    assert objective.normalisers(batch)["distill"] == sum(r.tokens for r in trained)
