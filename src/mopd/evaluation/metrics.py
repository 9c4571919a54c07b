"""Evaluation and teacher-signal metrics.

Sampling metrics (method section 9):

- ``mean@k``: average reward over the k samples of a prompt, then over prompts.
- ``pass@k``: the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` from n samples with c
  successes, evaluated as the product ``prod_{i=n-c+1}^{n} (1 - k/i)`` so that no large
  binomial coefficient is formed.

Ranking metrics for the teacher-signal analysis (method section 8), computed within one
prompt's group of rollouts from teacher ``scores`` (e.g. mean response log-prob) and
verifier ``rewards``:

- ``success_auc``: Mann-Whitney AUC of scores for successes (``reward >= threshold``)
  against failures; score ties count 1/2.
- ``pairwise_accuracy``: over pairs with different rewards, the fraction whose scores are
  ordered like the rewards; score ties count 1/2. Equals the AUC for 0/1 rewards.
- ``spearman``, ``kendall_tau`` (tau-b), ``point_biserial``: rank / linear correlations.
- ``top1_hit``: whether the highest-scored rollout is a success; when several share the
  top score, the fraction of successes among them (the expected hit under a random
  tie-break).

Every ranking metric returns ``None`` when it is undefined for the group -- a single class
(all successes or all failures), a constant input for a correlation, fewer than two
rollouts. Unlike the reference analysis code, such prompts are never scored 0: the
caller drops them (``bootstrap_ci`` skips ``None``) instead of biasing the average.

``bootstrap_ci`` gives a prompt-level percentile bootstrap interval of a mean.

numpy and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


# ------------------------------------------------------------------ sampling metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"pass_at_k: {name} must be an int, got {value!r}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    miss = 1.0  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_mean(correct_counts: Sequence[int], n: int | Sequence[int], k: int) -> float:
    """Mean pass@k over prompts; ``n`` is the sample count, shared or one per prompt."""
    if len(correct_counts) == 0:
        raise ValueError("pass_at_k_mean needs at least one prompt")
    ns = [n] * len(correct_counts) if isinstance(n, (int, np.integer)) else list(n)
    if len(ns) != len(correct_counts):
        raise ValueError(f"got {len(ns)} sample counts for {len(correct_counts)} prompts")
    return float(
        np.mean([pass_at_k(n_i, c_i, k) for n_i, c_i in zip(ns, correct_counts, strict=True)])
    )


def pass_at_k_from_rewards(
    rewards_per_prompt: Sequence[Sequence[float]], k: int, *, threshold: float = 0.5
) -> float:
    """Mean pass@k where a sample is correct when ``reward >= threshold``; n = samples per prompt."""
    counts = [sum(r >= threshold for r in rewards) for rewards in rewards_per_prompt]
    return pass_at_k_mean(counts, [len(rewards) for rewards in rewards_per_prompt], k)


def mean_at_k(rewards_per_prompt: Sequence[Sequence[float]]) -> float:
    """Average reward over each prompt's samples, then over prompts."""
    if len(rewards_per_prompt) == 0:
        raise ValueError("mean_at_k needs at least one prompt")
    if any(len(rewards) == 0 for rewards in rewards_per_prompt):
        raise ValueError("mean_at_k needs at least one sample per prompt")
    return float(np.mean([np.mean(np.asarray(r, dtype=np.float64)) for r in rewards_per_prompt]))


# ------------------------------------------------------------------ ranking metrics


def _pair(x: Sequence[float], y: Sequence[float], names: str) -> tuple[FloatArray, FloatArray]:
    x_N = np.asarray(x, dtype=np.float64)
    y_N = np.asarray(y, dtype=np.float64)
    if x_N.ndim != 1 or x_N.shape != y_N.shape:
        raise ValueError(f"{names} must be 1-D and of equal length, got {x_N.shape}, {y_N.shape}")
    if not (np.isfinite(x_N).all() and np.isfinite(y_N).all()):
        raise ValueError(f"{names} must be finite (no NaN or inf)")
    return x_N, y_N


def _average_ranks(x_N: FloatArray) -> FloatArray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = np.argsort(x_N, kind="stable")
    sorted_x = x_N[order]
    # Start index of each run of equal values, and each run's mean rank.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x_N)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty_like(x_N)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _pearson(x_N: FloatArray, y_N: FloatArray) -> float | None:
    if len(x_N) < 2:
        return None
    dx, dy = x_N - x_N.mean(), y_N - y_N.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:  # a constant input: correlation undefined
        return None
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def _ordering_agreement(scores_N: FloatArray, rewards_N: FloatArray) -> float | None:
    """Mean over pairs with different reward of 1 (same order), 0 (reversed), 1/2 (score tie)."""
    reward_sign_NN = np.sign(rewards_N[:, None] - rewards_N[None, :])
    score_sign_NN = np.sign(scores_N[:, None] - scores_N[None, :])
    n_pairs = int(np.count_nonzero(reward_sign_NN))  # each unordered pair counted twice
    if n_pairs == 0:
        return None
    agree = float((reward_sign_NN * score_sign_NN).sum())  # +1 agree, -1 disagree, 0 tie
    return 0.5 + 0.5 * agree / n_pairs


def success_auc(
    scores: Sequence[float], rewards: Sequence[float], threshold: float = 0.5
) -> float | None:
    """P(score of a success > score of a failure), ties 1/2; None for a single class."""
    scores_N, rewards_N = _pair(scores, rewards, "scores and rewards")
    success_N = rewards_N >= threshold
    n_pos, n_neg = int(success_N.sum()), int((~success_N).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(_average_ranks(scores_N)[success_N].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0  # Mann-Whitney U of the successes
    return u / (n_pos * n_neg)


def pairwise_accuracy(scores: Sequence[float], rewards: Sequence[float]) -> float | None:
    """Fraction of different-reward pairs whose scores order them correctly (ties 1/2).

    O(N^2) in the group size, fine for groups of rollouts. None when all rewards are equal.
    """
    scores_N, rewards_N = _pair(scores, rewards, "scores and rewards")
    return _ordering_agreement(scores_N, rewards_N)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None if either input is constant."""
    x_N, y_N = _pair(x, y, "x and y")
    return _pearson(_average_ranks(x_N), _average_ranks(y_N))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall tau-b (tie-corrected); None if either input is constant."""
    x_N, y_N = _pair(x, y, "x and y")
    sx_NN = np.sign(x_N[:, None] - x_N[None, :])
    sy_NN = np.sign(y_N[:, None] - y_N[None, :])
    # tau-b = sum sgn(dx) sgn(dy) / sqrt(#pairs untied in x * #pairs untied in y).
    denom = math.sqrt(float(np.abs(sx_NN).sum()) * float(np.abs(sy_NN).sum()))
    if denom == 0.0:
        return None
    return float(np.clip((sx_NN * sy_NN).sum() / denom, -1.0, 1.0))


def point_biserial(scores: Sequence[float], labels: Sequence[float]) -> float | None:
    """Pearson correlation of scores with 0/1 labels; None for a single class or constant scores."""
    scores_N, labels_N = _pair(scores, labels, "scores and labels")
    if not np.isin(labels_N, (0.0, 1.0)).all():
        raise ValueError("point_biserial labels must be 0/1 (or bool); threshold rewards first")
    return _pearson(scores_N, labels_N)


def top1_hit(
    scores: Sequence[float], rewards: Sequence[float], threshold: float = 0.5
) -> float | None:
    """1.0 if the top-scored rollout succeeds, else 0.0; ties at the top share the credit.

    None for a single class, where the answer says nothing about the teacher.
    """
    scores_N, rewards_N = _pair(scores, rewards, "scores and rewards")
    success_N = rewards_N >= threshold
    if success_N.all() or not success_N.any():
        return None
    return float(success_N[scores_N == scores_N.max()].mean())


# ---------------------------------------------------------------------- aggregation


def bootstrap_ci(
    values: Sequence[float | None],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean, low, high)``: mean of per-prompt values and its percentile bootstrap interval.

    ``None`` and NaN entries (prompts where the metric is undefined) are dropped before
    resampling; with nothing left the result is ``(nan, nan, nan)``. Deterministic for a
    given ``seed``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    kept_M = np.asarray([v for v in values if v is not None], dtype=np.float64)
    kept_M = kept_M[~np.isnan(kept_M)]
    m = len(kept_M)
    if m == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    # Resample in chunks so that memory stays bounded for many prompts.
    chunk = max(1, 1_000_000 // m)
    means_B = np.concatenate(
        [
            kept_M[rng.integers(0, m, size=(min(chunk, n_boot - start), m))].mean(axis=1)
            for start in range(0, n_boot, chunk)
        ]
    )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means_B, [tail, 1.0 - tail])
    return float(kept_M.mean()), float(low), float(high)
