"""Rollout shards: how a step's prompts are split across processes, and sampled.

A shard is a block of consecutive prompts of the step that is sampled, verified and given
peer contexts on its own, with its own seed (:func:`shard_seed`). With S shards and W
processes, process r takes shards ``r*S/W .. (r+1)*S/W``; S is ``train.rollout_shards``,
one per process when unset.

Why shards rather than "each process samples its prompts with a per-rank seed": the
rollout engine draws one random stream per `generate` call, so what a prompt receives
depends on which prompts share its call. Fixing the calls (one per shard) and their seeds
makes the rollouts independent of the process count: a one-process run with
``train.rollout_shards=W`` samples exactly what a W-process run samples, and any W that
divides S gives the same run. Groups are never split (peer selection needs the whole
group). The `unrelated_prompt` peer control fills its slots with successes of the other
groups *of the same shard*, so it needs at least two prompts per shard.

A single shard is seeded with the step seed itself, so single-process runs sample what
they sampled before shards existed: one `generate` call for the whole step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mopd.collect.contexts import TeacherInput, build_teacher_inputs, context_sums
from mopd.collect.sampling import sample_and_verify_groups
from mopd.config import Config, ConfigError
from mopd.core.seeding import derive_seed
from mopd.rollout.base import RolloutEngine, SamplingParams
from mopd.tasks.base import Task
from mopd.types import Problem, Rollout, Verdict


def shard_count(configured: int | None, world_size: int) -> int:
    """Rollout shards per step: `train.rollout_shards`, or one per process when unset."""
    return world_size if configured is None else configured


def local_shards(
    n_prompts: int, shards: int, world_size: int, rank: int
) -> list[tuple[int, range]]:
    """(shard index, prompt positions) of each rollout shard this rank samples, in order.

    Shard s covers prompts ``s*P/S .. (s+1)*P/S``. Fails with a :class:`ConfigError` when
    P is not a multiple of S or S not a multiple of W (a split would cut a rollout group
    or give the processes unequal work).
    """
    if n_prompts % shards:
        raise ConfigError(
            f"train.prompts_per_step={n_prompts} must be a multiple of the rollout shards "
            f"({shards}: train.rollout_shards, default one per process)"
        )
    if shards % world_size:
        raise ConfigError(
            f"train.rollout_shards={shards} must be a multiple of the number of processes "
            f"({world_size}); train.prompts_per_step must be a multiple of it too"
        )
    per_shard, per_rank = n_prompts // shards, shards // world_size
    return [
        (s, range(s * per_shard, (s + 1) * per_shard))
        for s in range(rank * per_rank, (rank + 1) * per_rank)
    ]


def shard_seed(step_seed: int, shard: int, shards: int) -> int:
    """Sampling and peer-selection seed of shard `shard`; a single shard uses the step seed."""
    return step_seed if shards == 1 else derive_seed(step_seed, "shard", shard)


@dataclass
class ShardSamples:
    """One process's share of a step: its shards' groups, verified, with teacher inputs."""

    problems: list[Problem] = field(default_factory=list)  # (P_local,)
    prompt_ids: list[tuple[int, ...]] = field(default_factory=list)  # (P_local, prompt length)
    groups: list[list[Rollout]] = field(default_factory=list)  # (P_local, G)
    verdicts: list[list[Verdict]] = field(default_factory=list)  # (P_local, G)
    teacher_inputs: list[list[TeacherInput]] | None = None  # (P_local, G) when distilling
    context_sums: dict[str, float] = field(default_factory=dict)  # see `context_sums`
    generate_s: float = 0.0
    verify_s: float = 0.0
    context_s: float = 0.0


def sample_local_shards(
    config: Config,
    engine: RolloutEngine,
    tokenizer: Any,
    task: Task,
    problems: Sequence[Problem],
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    teacher_inputs: bool = True,
    contrast: bool = False,
) -> ShardSamples:
    """Steps 1-4 of method.md for this rank's shards of the step's `problems`.

    `teacher_inputs`: build peer contexts and teacher prompts (objectives that distil);
    `contrast`: also each rollout's one-success and one-failure prompts.
    """
    params = SamplingParams(
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        max_new_tokens=config.rollout.max_new_tokens,
    )
    shards = shard_count(config.train.rollout_shards, world_size)
    out = ShardSamples(teacher_inputs=[] if teacher_inputs else None)
    for index, positions in local_shards(len(problems), shards, world_size, rank):
        shard = [problems[i] for i in positions]
        seed_s = shard_seed(seed, index, shards)
        sampled = sample_and_verify_groups(
            engine, tokenizer, task, shard, n=config.rollout.n, params=params, seed=seed_s
        )
        out.problems += shard
        out.prompt_ids += sampled.prompt_ids
        out.groups += sampled.groups
        out.verdicts += sampled.verdicts
        out.generate_s += sampled.generate_s
        out.verify_s += sampled.verify_s
        if out.teacher_inputs is not None:
            t0 = time.perf_counter()
            inputs = build_teacher_inputs(
                tokenizer,
                shard,
                sampled.groups,
                sampled.verdicts,
                peers=config.peers,
                templates=config.teacher.templates,
                max_prompt_tokens=config.teacher.max_prompt_tokens,
                use_context=config.teacher.use_context,
                seed=seed_s,
                layout=config.teacher.layout,
                contrast=contrast,
            )
            out.teacher_inputs += inputs
            if config.teacher.use_context:
                sums = context_sums(
                    inputs, sampled.groups, sampled.verdicts, peers=config.peers, seed=seed_s
                )
                for key, value in sums.items():
                    out.context_sums[key] = out.context_sums.get(key, 0.0) + value
            out.context_s += time.perf_counter() - t0
    return out
