"""Held-out evaluation: mean@k and pass@k over a task's eval prompts, with CIs and diversity.

:func:`sample_and_verify` draws k responses per prompt and scores them; :func:`evaluate`
turns that into the flat ``eval/*`` metrics the trainer logs. Besides mean@k, pass@1 and
pass@k it adds the prompt-level 95% bootstrap interval of each (``eval/ci_low/<name>``,
``eval/ci_high/<name>``) and the diversity of each prompt's samples
(``eval/distinct_1``, ``eval/distinct_2``, ``eval/unique_ratio``, ``eval/self_bleu``), so
that run reports can show both without keeping the responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mopd.collect.sampling import sample_and_verify_groups
from mopd.evaluation.diversity import diversity_summary
from mopd.evaluation.sampling import sampling_summary
from mopd.rollout.base import RolloutEngine, SamplingParams, sampling_bar
from mopd.tasks.base import Task
from mopd.types import Problem


@dataclass(frozen=True)
class EvalSamples:
    """k verified samples for each prompt, in prompt order."""

    problem_ids: list[str]
    rewards: list[list[float]]  # (P, k)
    texts: list[list[str]]  # (P, k)
    response_tokens: list[list[int]]  # (P, k)


def sample_and_verify(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Problem],
    *,
    k: int,
    params: SamplingParams,
    seed: int,
    progress: str | None = None,
) -> EvalSamples:
    """Sample k responses per prompt and verify them (one verifier call for the batch).

    `progress`: the label of a progress bar over the samples (on stderr); None: silent.
    """
    with sampling_bar(progress, len(problems) * k):
        sampled = sample_and_verify_groups(
            engine, tokenizer, task, problems, n=k, params=params, seed=seed
        )
    groups = sampled.groups
    return EvalSamples(
        problem_ids=[p.id for p in problems],
        rewards=[[v.reward for v in vs] for vs in sampled.verdicts],
        texts=[[r.text for r in g] for g in groups],
        response_tokens=[[len(r.response_ids) for r in g] for g in groups],
    )


def eval_metrics(
    samples: EvalSamples, k: int, *, threshold: float = 0.5, n_boot: int = 1000
) -> dict[str, float]:
    """Flat ``eval/*`` metrics of `samples` (module docstring); pass@k only for k > 1."""
    summary = sampling_summary(samples.rewards, k, threshold=threshold, n_boot=n_boot)
    names = [f"mean@{k}", "pass@1", *([f"pass@{k}"] if k > 1 else [])]
    lengths = [n for row in samples.response_tokens for n in row]
    metrics = {f"eval/{name}": summary[name].mean for name in names}
    metrics["eval/response_tokens_mean"] = sum(lengths) / len(lengths)
    for name in names:
        metrics[f"eval/ci_low/{name}"] = summary[name].low
        metrics[f"eval/ci_high/{name}"] = summary[name].high
    metrics.update({f"eval/{n}": v for n, v in diversity_summary(samples.texts).items()})
    return metrics


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Problem],
    *,
    k: int,
    params: SamplingParams,
    seed: int,
    progress: str | None = None,
) -> dict[str, float]:
    """Sample k responses per prompt and score them (`progress`: see sample_and_verify).

    Returns ``eval/mean@k`` (mean reward), ``eval/pass@1`` and ``eval/pass@k`` (unbiased
    estimator with n = k samples and a success meaning reward >= 0.5), the mean response
    length, their bootstrap intervals and the diversity metrics (module docstring).
    """
    samples = sample_and_verify(
        engine, tokenizer, task, problems, k=k, params=params, seed=seed, progress=progress
    )
    return eval_metrics(samples, k)


def summarize_samples(
    samples_by_task: dict[str, EvalSamples],
    k: int,
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """JSON-ready per-task and overall summary: mean@k, pass@1..k with CIs, diversity.

    "overall" pools the prompts of every task, so each prompt weighs the same.
    """

    def block(rewards: list[list[float]], texts: list[list[str]]) -> dict[str, Any]:
        summary = sampling_summary(rewards, k, threshold=threshold, n_boot=n_boot, seed=seed)
        return {
            "n_prompts": len(rewards),
            "metrics": {name: s.as_dict() for name, s in summary.items()},
            "diversity": diversity_summary(texts),
        }

    tasks = {name: block(s.rewards, s.texts) for name, s in samples_by_task.items()}
    pooled_rewards = [r for s in samples_by_task.values() for r in s.rewards]
    pooled_texts = [t for s in samples_by_task.values() for t in s.texts]
    return {"tasks": tasks, "overall": block(pooled_rewards, pooled_texts)}
