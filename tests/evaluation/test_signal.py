"""Teacher-signal summaries and sampling summaries against independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from mopd.evaluation.sampling import per_prompt_sampling, sampling_summary
from mopd.evaluation.signal import group_signal, has_both_classes, summarize_signal

pytestmark = pytest.mark.unit


def _brute_pass_at_k(rewards: list[float], k: int) -> float:
    """Fraction of all k-subsets of the samples that contain a success."""
    subsets = list(itertools.combinations(rewards, k))
    return sum(any(r >= 0.5 for r in s) for s in subsets) / len(subsets)


def test_group_signal_matches_scipy_on_a_tied_group():
    scores = [-1.0, -0.5, -0.5, -2.0, -0.1, -0.5]
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    got = group_signal(scores, rewards)
    pos = [s for s, r in zip(scores, rewards, strict=True) if r]
    neg = [s for s, r in zip(scores, rewards, strict=True) if not r]
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert got["success_auc"] == pytest.approx(u / (len(pos) * len(neg)))
    assert got["pairwise_accuracy"] == pytest.approx(u / (len(pos) * len(neg)))
    assert got["spearman"] == pytest.approx(stats.spearmanr(scores, rewards).statistic)
    assert got["kendall_tau"] == pytest.approx(stats.kendalltau(scores, rewards).statistic)
    assert got["point_biserial"] == pytest.approx(stats.pointbiserialr(rewards, scores).statistic)
    assert got["top1_hit"] == 1.0  # -0.1 is the top score and a success


def test_single_class_prompts_are_dropped_not_counted_as_zero():
    mixed = ([0.0, 1.0, 2.0], [0.0, 1.0, 1.0])  # AUC 1.0
    all_fail = ([0.0, 1.0, 2.0], [0.0, 0.0, 0.0])
    out = summarize_signal([mixed, all_fail, all_fail], n_boot=50)
    auc = out["both_present"]["success_auc"]
    assert (auc.mean, auc.n_prompts) == (1.0, 1)
    assert out["all"]["success_auc"].n_prompts == 1  # still undefined on single-class prompts
    assert (auc.low, auc.high) == (1.0, 1.0)


def test_partial_credit_prompt_counts_for_rank_correlations_only_in_all():
    partial = ([0.0, 1.0, 2.0], [0.1, 0.2, 0.3])  # no success, but rewards differ
    mixed = ([2.0, 1.0, 0.0], [0.0, 1.0, 1.0])  # reversed: spearman -1 * ...
    out = summarize_signal([partial, mixed], n_boot=50)
    rho_mixed = stats.spearmanr(*mixed).statistic
    assert out["both_present"]["spearman"].mean == pytest.approx(rho_mixed)
    assert out["all"]["spearman"].n_prompts == 2
    assert out["all"]["spearman"].mean == pytest.approx((1.0 + rho_mixed) / 2)
    assert out["all"]["success_auc"].n_prompts == 1


def test_summary_with_no_defined_prompt_is_nan():
    out = summarize_signal([([0.0, 1.0], [1.0, 1.0])], n_boot=10)
    s = out["both_present"]["success_auc"]
    assert s.n_prompts == 0 and math.isnan(s.mean)


def test_has_both_classes_uses_the_threshold():
    assert has_both_classes([0.4, 0.6])
    assert not has_both_classes([0.4, 0.49])
    assert has_both_classes([0.4, 0.9], threshold=0.8)


@pytest.mark.parametrize("correct", [0, 1, 3, 5])
def test_per_prompt_pass_at_every_k_matches_brute_force(correct):
    rewards = [1.0] * correct + [0.0] * (5 - correct)
    got = per_prompt_sampling(rewards, 5)
    assert got["mean@5"] == pytest.approx(correct / 5)
    for k in range(1, 6):
        assert got[f"pass@{k}"] == pytest.approx(_brute_pass_at_k(rewards, k))


def test_sampling_summary_ci_resamples_prompts():
    rewards = [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    out = sampling_summary(rewards, 2, n_boot=2000, seed=3)
    per_prompt = np.array([0.5, 1.0, 0.0, 0.5])
    assert out["mean@2"].mean == pytest.approx(per_prompt.mean())
    # Independent percentile bootstrap over the same per-prompt values.
    rng = np.random.default_rng(3)
    means = per_prompt[rng.integers(0, 4, size=(2000, 4))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    assert (out["mean@2"].low, out["mean@2"].high) == pytest.approx((low, high))
    assert out["pass@2"].mean == pytest.approx(np.mean([1.0, 1.0, 0.0, 1.0]))
    assert out["pass@1"].n_prompts == 4


def test_sampling_summary_rejects_a_prompt_with_the_wrong_sample_count():
    with pytest.raises(ValueError, match="expected k=2"):
        sampling_summary([[1.0, 0.0], [1.0]], 2)
