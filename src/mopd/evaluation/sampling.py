"""Sampling metrics with prompt-level confidence intervals.

From k sampled rewards per prompt: ``mean@k`` (mean reward) and the unbiased ``pass@k'``
(:func:`mopd.evaluation.metrics.pass_at_k` with n = k samples) for every k' = 1..k. Each
is first computed per prompt, then averaged over prompts with a percentile bootstrap
interval that resamples prompts (the unit the evaluation set is drawn from); the samples
of a prompt are never resampled apart.
"""

from __future__ import annotations

from collections.abc import Sequence

from mopd.evaluation.metrics import bootstrap_ci, pass_at_k
from mopd.evaluation.signal import MetricSummary

__all__ = ["per_prompt_sampling", "sampling_summary"]


def per_prompt_sampling(
    rewards: Sequence[float], k: int, *, threshold: float = 0.5
) -> dict[str, float]:
    """``mean@k`` and ``pass@1 .. pass@k`` of one prompt from its k (= n) sampled rewards."""
    if len(rewards) != k:
        raise ValueError(f"expected k={k} rewards for the prompt, got {len(rewards)}")
    correct = sum(r >= threshold for r in rewards)
    out = {f"mean@{k}": sum(rewards) / k}
    out.update({f"pass@{j}": pass_at_k(k, correct, j) for j in range(1, k + 1)})
    return out


def sampling_summary(
    rewards_per_prompt: Sequence[Sequence[float]],
    k: int,
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, MetricSummary]:
    """Prompt-averaged ``mean@k`` and ``pass@1 .. pass@k``, each with its bootstrap CI."""
    if not rewards_per_prompt:
        raise ValueError("sampling_summary needs at least one prompt")
    rows = [per_prompt_sampling(r, k, threshold=threshold) for r in rewards_per_prompt]
    out = {}
    for name in rows[0]:
        mean, low, high = bootstrap_ci(
            [row[name] for row in rows], n_boot=n_boot, confidence=confidence, seed=seed
        )
        out[name] = MetricSummary(mean, low, high, len(rows))
    return out
