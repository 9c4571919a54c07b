"""Teacher-signal statistics: how well teacher scores rank a prompt's rollouts.

For every prompt the analysis holds the teacher's score of each of its G rollouts under a
context condition (e.g. the mean per-token log-prob of the response) and the verifier's
rewards. :func:`group_signal` computes the ranking metrics of
:mod:`mopd.evaluation.metrics` for one prompt; :func:`summarize_signal` averages each
metric over prompts with a prompt-level percentile bootstrap interval, twice:

- ``both_present``: only prompts with at least one success and one failure, the set the
  paper reports on;
- ``all``: every prompt where the metric is defined. With 0/1 rewards every ranking metric
  is undefined on single-class prompts, so the two coincide; with partial-credit rewards
  Spearman, Kendall and pairwise accuracy are also defined on prompts whose rewards differ
  without crossing the success threshold.

An undefined value (``None``) is dropped, never counted as 0, and the number of prompts
that entered each mean is reported next to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mopd.evaluation.metrics import (
    bootstrap_ci,
    kendall_tau,
    pairwise_accuracy,
    point_biserial,
    spearman,
    success_auc,
    top1_hit,
)

__all__ = [
    "SIGNAL_METRICS",
    "MetricSummary",
    "group_signal",
    "has_both_classes",
    "summarize_signal",
]

# Display order of the per-prompt metrics.
SIGNAL_METRICS = (
    "success_auc",
    "pairwise_accuracy",
    "spearman",
    "kendall_tau",
    "point_biserial",
    "top1_hit",
)


@dataclass(frozen=True)
class MetricSummary:
    """Mean of a per-prompt metric over the prompts where it is defined, with its CI."""

    mean: float  # nan when no prompt defines the metric
    low: float
    high: float
    n_prompts: int  # prompts that entered the mean

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n_prompts}


def has_both_classes(rewards: Sequence[float], threshold: float = 0.5) -> bool:
    """True when the group holds at least one success and one failure."""
    successes = [r >= threshold for r in rewards]
    return any(successes) and not all(successes)


def group_signal(
    scores: Sequence[float], rewards: Sequence[float], threshold: float = 0.5
) -> dict[str, float | None]:
    """Every metric of :data:`SIGNAL_METRICS` for one prompt's (G,) scores and rewards."""
    labels = [1.0 if r >= threshold else 0.0 for r in rewards]
    return {
        "success_auc": success_auc(scores, rewards, threshold),
        "pairwise_accuracy": pairwise_accuracy(scores, rewards),
        "spearman": spearman(scores, rewards),
        "kendall_tau": kendall_tau(scores, rewards),
        "point_biserial": point_biserial(scores, labels),
        "top1_hit": top1_hit(scores, rewards, threshold),
    }


def summarize_signal(
    groups: Sequence[tuple[Sequence[float], Sequence[float]]],
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, MetricSummary]]:
    """``{"both_present" | "all": {metric: MetricSummary}}`` over prompts.

    groups: one ``(scores_G, rewards_G)`` pair per prompt (G may differ between prompts).
    """
    per_prompt = [group_signal(s, r, threshold) for s, r in groups]
    mixed = [has_both_classes(r, threshold) for _, r in groups]
    subsets: Mapping[str, list[dict[str, float | None]]] = {
        "both_present": [m for m, keep in zip(per_prompt, mixed, strict=True) if keep],
        "all": per_prompt,
    }
    out: dict[str, dict[str, MetricSummary]] = {}
    for subset, rows in subsets.items():
        out[subset] = {}
        for name in SIGNAL_METRICS:
            values = [row[name] for row in rows]
            mean, low, high = bootstrap_ci(values, n_boot=n_boot, confidence=confidence, seed=seed)
            defined = sum(v is not None for v in values)
            out[subset][name] = MetricSummary(mean, low, high, defined)
    return out
