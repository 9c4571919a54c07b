"""GRPO (the paper's RL baseline): PPO-clip on group-relative advantages.

Advantage = reward - group mean (optionally / std), one per rollout; per token the
clipped surrogate of ``exp(log p_T - log p_old)`` with the student at the rollout
temperature T (the distribution the engine sampled from). Rows with zero advantage add
nothing, so only the others are forwarded, but every rollout counts in the denominator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from mopd.config import Config, ConfigError
from mopd.core.baselines import grpo_loss
from mopd.core.losses import aggregation_count
from mopd.objectives.base import Objective, StepLog
from mopd.objectives.batch import Row, Scorers, StepBatch, StudentForward

DENOM = "grpo"


def grpo_normalisers(config: Config, batch: StepBatch) -> dict[str, float]:
    return {DENOM: aggregation_count([r.tokens for r in batch.rows], config.loss.aggregation)}


def row_advantages(forward: StudentForward) -> Tensor:
    """The group advantage of each of the forward's rows.  # (B,)"""
    logits = forward.logits_BRV
    return torch.tensor([r.advantage for r in forward.rows], device=logits.device)


def grpo_term(
    config: Config,
    forward: StudentForward,
    norms: Mapping[str, float],
    log: StepLog,
    token_advantages_BR: Tensor | None = None,
    term: str = "grpo",
) -> Tensor:
    """The PPO-clip loss of the forward's rows, with their group advantages or the given
    per-token ones, logged as ``loss/<term>``; also logs the clipped share of trained
    tokens and the mean ratio to the sampling policy."""
    logp_BR = forward.logprobs(config.rollout.temperature)
    mask_BR = forward.mask_BR
    adv_B = row_advantages(forward).to(logp_BR.dtype)
    loss, stats = grpo_loss(
        logp_BR,
        forward.old_logprobs(),
        adv_B if token_advantages_BR is None else token_advantages_BR,
        mask_BR,
        clip_low=config.loss.clip_low,
        clip_high=config.loss.clip_high,
        aggregation=config.loss.aggregation,
        denominator=norms[DENOM],
    )
    log.losses[term] += float(loss.detach())
    n_valid = float(mask_BR.sum())
    trained = float(mask_BR[adv_B != 0].sum())  # rows with zero advantage are never clipped
    log.add_ratio("grpo/clip_fraction", stats["grpo/clip_fraction"] * n_valid, trained)
    log.add_ratio("grpo/ratio_mean", stats["grpo/ratio_mean"] * n_valid, n_valid)
    return loss


class Grpo(Objective):
    """``loss.kind=grpo``."""

    name = "grpo"
    min_group_size = 2
    reports: ClassVar[tuple[str, ...]] = ("grpo/clip_fraction", "grpo/ratio_mean")

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        if config.loss.grpo_mix:
            raise ConfigError(
                f"loss.grpo_mix: weights the distillation term of loss.kind=grpo+distill; got "
                f"{config.loss.grpo_mix} with loss.kind={cls.name}: set loss.kind=grpo+distill, "
                "or loss.grpo_mix=0",
            )

    def rows(self, batch: StepBatch) -> list[Row]:
        return [r for r in batch.rows if r.advantage != 0.0]

    def normalisers(self, batch: StepBatch) -> dict[str, float]:
        return grpo_normalisers(self.config, batch)

    def loss(
        self, forward: StudentForward, norms: Mapping[str, float], scorers: Scorers, log: StepLog
    ) -> Tensor:
        return grpo_term(self.config, forward, norms, log)
