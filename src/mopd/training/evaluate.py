"""Held-out evaluation during training: mean@k and pass@k over the task's eval prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mopd.evaluation.metrics import pass_at_k
from mopd.rollout.base import RolloutEngine, SamplingParams
from mopd.tasks.base import Task, verify_batch
from mopd.training.contexts import chat_prompt_ids
from mopd.types import Problem


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Problem],
    *,
    k: int,
    params: SamplingParams,
    seed: int,
) -> dict[str, float]:
    """Sample k responses per prompt and score them.

    Returns ``eval/mean@k`` (mean reward), ``eval/pass@1`` and ``eval/pass@k`` (unbiased
    estimator with n = k samples and a success meaning reward >= 0.5), and the mean
    response length.
    """
    prompt_ids = [chat_prompt_ids(tokenizer, p.messages) for p in problems]
    groups = engine.generate(prompt_ids, n=k, params=params, seed=seed)
    rewards: list[float] = []
    correct: list[int] = []
    lengths: list[int] = []
    for problem, group in zip(problems, groups, strict=True):
        verdicts = verify_batch(task, [problem] * len(group), [r.text for r in group])
        rs = [v.reward for v in verdicts]
        rewards.append(sum(rs) / len(rs))
        correct.append(sum(1 for r in rs if r >= 0.5))
        lengths.extend(len(r.response_ids) for r in group)
    n = len(problems)
    metrics = {
        f"eval/mean@{k}": sum(rewards) / n,
        "eval/pass@1": sum(pass_at_k(k, c, 1) for c in correct) / n,
        "eval/response_tokens_mean": sum(lengths) / len(lengths),
    }
    if k > 1:
        metrics[f"eval/pass@{k}"] = sum(pass_at_k(k, c, k) for c in correct) / n
    return metrics
