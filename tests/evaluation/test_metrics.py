"""Sampling and teacher-signal metrics against brute force, scipy and hand-computed values."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from mopd.evaluation.metrics import (
    bootstrap_ci,
    kendall_tau,
    mean_at_k,
    pairwise_accuracy,
    pass_at_k,
    pass_at_k_from_rewards,
    pass_at_k_mean,
    point_biserial,
    spearman,
    success_auc,
    top1_hit,
)

pytestmark = pytest.mark.unit


def random_group(seed: int, n: int = 12) -> tuple[list[float], list[float]]:
    """Scores with ties (small integer grid) and 0/1 rewards holding both classes."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, 5, size=n) / 2.0).tolist()
    rewards = rng.integers(0, 2, size=n).astype(float)
    rewards[:2] = [0.0, 1.0]
    return scores, rewards.tolist()


# ------------------------------------------------------------------------ pass@k, mean@k


def test_pass_at_k_equals_fraction_of_k_subsets_with_a_success() -> None:
    for n in range(1, 8):
        for c in range(n + 1):
            labels = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(labels, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_hand_values() -> None:
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert pass_at_k(10, 2, 3) == pytest.approx(1 - 56 / 120)  # 1 - C(8,3)/C(10,3)
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0


def test_pass_at_k_is_accurate_for_large_n() -> None:
    n, c, k = 2000, 3, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [(8, 1, 0, "k"), (8, 1, 9, "k"), (8, 9, 2, "c"), (8, -1, 2, "c")],
)
def test_pass_at_k_rejects_out_of_range_arguments(n: int, c: int, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integer_counts() -> None:
    with pytest.raises(TypeError, match="c must be an int"):
        pass_at_k(8, 1.5, 2)  # type: ignore[arg-type]


def test_mean_at_k_averages_samples_before_prompts() -> None:
    # Per prompt 0.5 and 1.0: 0.75, not the pooled 4/6.
    assert mean_at_k([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0]]) == pytest.approx(0.75)
    assert mean_at_k([[0.25, 0.75]]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one prompt"):
        mean_at_k([])
    with pytest.raises(ValueError, match="one sample per prompt"):
        mean_at_k([[1.0], []])


def test_pass_at_k_mean_and_from_rewards() -> None:
    expected = (pass_at_k(4, 1, 2) + pass_at_k(4, 0, 2) + pass_at_k(4, 4, 2)) / 3
    assert pass_at_k_mean([1, 0, 4], 4, 2) == pytest.approx(expected)
    assert pass_at_k_mean([1, 0], [4, 2], 2) == pytest.approx((1 - 3 / 6) / 2)
    rewards = [[1.0, 0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.9, 1.0, 0.6]]
    assert pass_at_k_from_rewards(rewards, 2) == pytest.approx(expected)
    with pytest.raises(ValueError, match="sample counts"):
        pass_at_k_mean([1, 0], [4], 2)


# ------------------------------------------------------------------------ ranking metrics


def test_success_auc_hand_value_with_tie() -> None:
    # Success/failure pairs: (0.9,0.1) 1, (0.9,0.5) 1, (0.5,0.1) 1, (0.5,0.5) tie 1/2.
    assert success_auc([0.9, 0.1, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("seed", range(6))
def test_success_auc_matches_mann_whitney_u(seed: int) -> None:
    scores, rewards = random_group(seed)
    pos = [s for s, r in zip(scores, rewards, strict=True) if r == 1]
    neg = [s for s, r in zip(scores, rewards, strict=True) if r == 0]
    u = stats.mannwhitneyu(pos, neg).statistic
    assert success_auc(scores, rewards) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_success_auc_uses_threshold_on_partial_rewards() -> None:
    scores, rewards = [0.1, 0.2, 0.3], [0.4, 0.2, 0.6]
    assert success_auc(scores, rewards) == 1.0  # {0.3} vs {0.1, 0.2}
    assert success_auc(scores, rewards, threshold=0.3) == 0.5  # {0.1, 0.3} vs {0.2}


def test_pairwise_accuracy_brute_force_on_graded_rewards() -> None:
    rng = np.random.default_rng(7)
    scores = (rng.integers(0, 4, size=10) / 3.0).tolist()
    rewards = (rng.integers(0, 3, size=10) / 2.0).tolist()
    credit, pairs = 0.0, 0
    for i, j in itertools.combinations(range(10), 2):
        if rewards[i] == rewards[j]:
            continue
        pairs += 1
        hi, lo = (i, j) if rewards[i] > rewards[j] else (j, i)
        credit += 1.0 if scores[hi] > scores[lo] else 0.5 if scores[hi] == scores[lo] else 0.0
    assert pairwise_accuracy(scores, rewards) == pytest.approx(credit / pairs, abs=1e-12)


def test_pairwise_accuracy_equals_auc_for_binary_rewards() -> None:
    scores, rewards = random_group(3)
    assert pairwise_accuracy(scores, rewards) == pytest.approx(success_auc(scores, rewards))
    assert pairwise_accuracy([3.0, 2.0, 1.0], [1.0, 0.5, 0.0]) == 1.0
    assert pairwise_accuracy([1.0, 2.0, 3.0], [1.0, 0.5, 0.0]) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_correlations_match_scipy(seed: int) -> None:
    scores, rewards = random_group(seed)
    rng = np.random.default_rng(100 + seed)
    graded = (rng.integers(0, 3, size=len(scores)) / 2.0).tolist()
    assert spearman(scores, graded) == pytest.approx(stats.spearmanr(scores, graded)[0])
    assert kendall_tau(scores, graded) == pytest.approx(stats.kendalltau(scores, graded)[0])
    assert point_biserial(scores, rewards) == pytest.approx(
        stats.pointbiserialr([bool(r) for r in rewards], scores)[0]
    )


def test_correlation_hand_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x all distinct, y = [0,0,1,1]: concordant 4, discordant 0, untied-in-y pairs 4 of 6.
    assert kendall_tau([1, 2, 3, 4], [0, 0, 1, 1]) == pytest.approx(4 / math.sqrt(6 * 4))
    # Pearson of [0,1] labels with [0,2] scores is exactly 1.
    assert point_biserial([0.0, 2.0], [False, True]) == pytest.approx(1.0)


def test_top1_hit_hand_values() -> None:
    assert top1_hit([0.1, 0.9, 0.3], [0, 1, 0]) == 1.0
    assert top1_hit([0.1, 0.9, 0.3], [1, 0, 1]) == 0.0
    # Tie at the top between a success and a failure: expected hit of a random pick.
    assert top1_hit([0.9, 0.9, 0.3], [1, 0, 1]) == 0.5
    assert top1_hit([-1.0, -2.0], [0.4, 0.6], threshold=0.5) == 0.0


def test_undefined_metrics_return_none_not_zero() -> None:
    scores = [0.3, 0.1, 0.2]
    all_fail, all_pass = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    for rewards in (all_fail, all_pass):
        assert success_auc(scores, rewards) is None
        assert pairwise_accuracy(scores, rewards) is None
        assert top1_hit(scores, rewards) is None
        assert point_biserial(scores, rewards) is None
        assert spearman(scores, rewards) is None
        assert kendall_tau(scores, rewards) is None
    constant = [0.5, 0.5, 0.5]
    assert spearman(constant, [0, 1, 1]) is None
    assert kendall_tau(constant, [0, 1, 1]) is None
    assert point_biserial(constant, [0, 1, 1]) is None
    assert spearman([1.0], [2.0]) is None and kendall_tau([], []) is None
    assert success_auc([], []) is None and top1_hit([], []) is None


def test_constant_scores_against_mixed_rewards_are_chance_not_undefined() -> None:
    assert success_auc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5
    assert pairwise_accuracy([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5
    assert top1_hit([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0]) == 0.25


def test_ranking_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        success_auc([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="finite"):
        spearman([0.1, float("nan")], [1.0, 0.0])
    with pytest.raises(ValueError, match="0/1"):
        point_biserial([0.1, 0.2], [0.5, 1.0])


# ---------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean_and_matches_normal_approximation() -> None:
    values = np.random.default_rng(0).normal(0.3, 1.0, size=400)
    mean, low, high = bootstrap_ci(values.tolist(), n_boot=4000)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    half_width = 1.959964 * values.std(ddof=1) / math.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.2 * half_width)


def test_bootstrap_ci_is_reproducible_with_a_seed() -> None:
    values = [0.1, 0.9, 0.4, 0.7, 0.2, 0.5, 1.0, 0.0]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_ci_drops_undefined_prompts() -> None:
    values = [0.1, 0.9, 0.4, 0.7]
    with_none = [None, 0.1, 0.9, None, 0.4, float("nan"), 0.7]
    assert bootstrap_ci(with_none, seed=1) == bootstrap_ci(values, seed=1)
    assert bootstrap_ci(with_none)[0] == pytest.approx(0.525)


def test_bootstrap_ci_degenerate_inputs() -> None:
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([None, None]))
    assert bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([0.1], n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([0.1], confidence=1.0)
