"""Sample G rollouts per prompt and verify them: the first half of every step, evaluation
and analysis share it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mopd.collect.contexts import chat_prompt_ids
from mopd.rollout.base import RolloutEngine, SamplingParams
from mopd.tasks.base import Task, verify_batch
from mopd.types import Problem, Rollout, Verdict

T = TypeVar("T")


def regroup(flat: Sequence[T], sizes: Sequence[int]) -> list[list[T]]:
    """Split a flat list into consecutive groups of the given sizes."""
    out, start = [], 0
    for n in sizes:
        out.append(list(flat[start : start + n]))
        start += n
    return out


@dataclass
class SampledGroups:
    prompt_ids: list[tuple[int, ...]]  # (P, prompt length)
    groups: list[list[Rollout]]  # (P, G)
    verdicts: list[list[Verdict]]  # (P, G)
    generate_s: float
    verify_s: float


def sample_and_verify_groups(
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Problem],
    *,
    n: int,
    params: SamplingParams,
    seed: int,
) -> SampledGroups:
    """G = `n` rollouts per prompt, verified in one call so a verifier can parallelise."""
    prompt_ids = [tuple(chat_prompt_ids(tokenizer, p.messages)) for p in problems]
    t0 = time.perf_counter()
    groups = engine.generate(prompt_ids, n=n, params=params, seed=seed)
    t1 = time.perf_counter()
    flat = verify_batch(
        task,
        [p for p, g in zip(problems, groups, strict=True) for _ in g],
        [r.text for g in groups for r in g],
    )
    verdicts = regroup(flat, [len(g) for g in groups])
    return SampledGroups(prompt_ids, groups, verdicts, t1 - t0, time.perf_counter() - t1)
