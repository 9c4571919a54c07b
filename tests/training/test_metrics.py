"""Step metrics are ratios of counts summed over processes (pure functions)."""

from __future__ import annotations

import math

import pytest

from mopd.collect.contexts import TeacherInput
from mopd.objectives import Row, StepBatch, StepLog
from mopd.training.metrics import in_group_auc, step_counts, step_metrics
from mopd.types import PeerContext, Rollout

pytestmark = pytest.mark.unit


def _row(group: int, index: int, reward: float, n_tokens: int, truncated: bool = False) -> Row:
    rollout = Rollout(tuple(range(n_tokens)), (0.0,) * n_tokens, "x", truncated)
    return Row(group, index, (1,), rollout, reward, reward >= 1.0)


def _input(has_context: bool, prompt: int) -> TeacherInput:
    return TeacherInput(tuple(range(prompt)), PeerContext(), has_context, False, "")


BATCH = StepBatch(
    (_row(0, 0, 1.0, 4), _row(0, 1, 0.0, 6, True), _row(1, 0, 0.0, 2), _row(1, 1, 0.0, 8, True)),
    n_groups=2,
)


def test_in_group_auc_uses_groups_with_both_classes_scored():
    scores = {(0, 0): -0.1, (0, 1): -0.9, (1, 0): -0.2, (1, 1): -0.3}
    assert in_group_auc(BATCH, scores) == (1.0, 1)  # group 1 has no success
    assert in_group_auc(BATCH, {(0, 0): -0.1}) == (0.0, 0)


def test_counts_of_two_processes_sum_to_the_metrics_of_the_whole_batch():
    log = StepLog(losses={"grpo": 0.25}, total=0.25, ratios={"grpo/clip_fraction": [2.0, 8.0]})
    inputs = [[_input(True, 10), _input(False, 3)], [_input(True, 20), _input(True, 30)]]
    a = step_counts(
        BATCH, log, inputs, {"rollouts": 4.0, "mean_failures": 2.0}, success_threshold=1.0
    )
    b = dict(a)  # a second process with the same counts
    total = {k: a[k] + b[k] for k in a}
    m = step_metrics(total, {"generate": 2.0}, grad_norm=0.5, lr=1e-3)
    assert m["rollout/success_rate"] == 0.25 and m["rollout/reward_mean"] == 0.25
    assert m["rollout/mixed_group_fraction"] == 0.5
    assert m["rollout/response_tokens_mean"] == 5.0 and m["rollout/truncated_fraction"] == 0.5
    assert m["loss/grpo"] == 0.5 and m["loss/total"] == 0.5
    assert m["grpo/clip_fraction"] == 0.25
    assert m["teacher/context_fraction"] == 0.75 and m["teacher/prompt_tokens_mean"] == 20.0
    assert m["teacher/failures_shown"] == 0.5
    assert math.isnan(m["teacher/success_auc"])  # no scores: no group to rank
    assert m["perf/tokens_per_s"] == 40 / 2.0 and m["time/generate"] == 2.0


def test_a_ratio_with_no_count_is_nan_and_no_teacher_means_no_teacher_metrics():
    log = StepLog(ratios={"rollout/logprob_mismatch": [0.0, 0.0]})
    counts = step_counts(BATCH, log, None, {}, success_threshold=1.0)
    m = step_metrics(counts, {"generate": 1.0}, grad_norm=0.0, lr=0.0)
    assert math.isnan(m["rollout/logprob_mismatch"])
    assert not any(k.startswith("teacher/") for k in m)
