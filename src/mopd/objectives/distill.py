"""Peer-conditioned distillation (MOPD, SDPO, OPD): the student matches the teacher.

Per token, the divergence between the student's and the teacher's next-token
distributions at the rollout's own tokens (method.md section 4), optionally weighted by
truncated importance weights, aggregated over the rows whose teacher saw a context:
rows without one would add zero loss, so they are neither forwarded nor counted.

For every scored rollout the term also records the teacher's mean token log-prob (its
score, whose in-group AUC against the verifier is logged) and the teacher-minus-student
log-prob gap, split by success and failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mopd.config import Config
from mopd.core.losses import aggregate, aggregation_count, token_logprobs
from mopd.core.token_loss import distill_token_loss, importance_weighted
from mopd.objectives.base import Objective, StepLog
from mopd.objectives.batch import Row, Scorers, StepBatch, StudentForward, TeacherRequest

# Normaliser keys: rows with a context (all processes) and the aggregation denominator.
ROWS, DENOM = "distill/rows", "distill"


def context_requests(rows: Sequence[Row]) -> list[TeacherRequest]:
    """The teacher's peer-context prompt for each row that has one."""
    return [(i, r.teacher.prompt_ids) for i, r in enumerate(rows) if r.teacher and r.has_context]


def distill_normalisers(config: Config, rows: Sequence[Row]) -> dict[str, float]:
    mode = config.loss.aggregation
    return {ROWS: len(rows), DENOM: aggregation_count([r.tokens for r in rows], mode)}


def loss_temperature(config: Config) -> float:
    """T of the distillation loss: ``loss.temperature``, else the rollout temperature."""
    t = config.loss.temperature
    return config.rollout.temperature if t is None else t


def distill_term(
    config: Config, forward: StudentForward, norms: Mapping[str, float], log: StepLog
) -> Tensor:
    """The distillation loss of the forward's rows the teacher scored, at `loss_temperature`."""
    loss_cfg = config.loss
    temp = loss_temperature(config)
    rows: Sequence[Row] = forward.rows
    s_BRV, mask_BR = forward.logits_BRV, forward.mask_BR
    ids_BR = forward.batch.response_ids
    # With gradient only where the estimator needs it (else: the gap metric alone).
    sampled = loss_cfg.estimator == "sampled-token"
    s_logp_BR = forward.logprobs(temp) if sampled else forward.sampling_logprobs(temp)
    samp_BR = forward.sampling_logprobs(config.rollout.temperature)
    old_BR = forward.old_logprobs()
    index, t_BRV = forward.teacher_index, forward.teacher_BRV
    if t_BRV is None:
        raise ValueError("distill_term needs the teacher's logits: see context_requests")
    if len(index) < len(rows):  # a sub-batch: the other rows have no teacher context
        rows = [rows[i] for i in index]
        s_BRV, mask_BR, ids_BR = s_BRV[index], mask_BR[index], ids_BR[index]
        s_logp_BR, samp_BR, old_BR = s_logp_BR[index], samp_BR[index], old_BR[index]
    t_logp_BR = token_logprobs(t_BRV, ids_BR, temperature=temp)
    per_tok_BR = distill_token_loss(
        s_BRV,
        t_BRV,
        s_logp_BR,
        t_logp_BR,
        estimator=loss_cfg.estimator,
        k=loss_cfg.topk,
        alpha=loss_cfg.alpha,
        add_tail=loss_cfg.add_tail,
        temperature=temp,
    )
    per_tok_BR = importance_weighted(per_tok_BR, samp_BR, old_BR, loss_cfg.is_clip)
    loss = aggregate(per_tok_BR, mask_BR, loss_cfg.aggregation, denominator=norms[DENOM])
    log.losses["distill"] += float(loss.detach())
    record_signal(log, rows, t_logp_BR, s_logp_BR, mask_BR)
    return loss


@torch.no_grad()
def record_signal(
    log: StepLog, rows: Sequence[Row], t_logp_BR: Tensor, s_logp_BR: Tensor, mask_BR: Tensor
) -> None:
    """Per-rollout signal quality of the teacher-scored `rows`: the teacher score (mean
    log-prob; feeds the in-group AUC and the rollout records) and the teacher-minus-student
    gap on successes and on failures."""
    n_tok_B = mask_BR.sum(1).clamp_min(1)
    score_B = (t_logp_BR * mask_BR).sum(1) / n_tok_B
    gap_B = ((t_logp_BR - s_logp_BR.detach()) * mask_BR).sum(1) / n_tok_B
    for row, score, gap in zip(rows, score_B.tolist(), gap_B.tolist(), strict=True):
        log.teacher_scores[(row.group, row.index)] = score
        log.add_ratio("gap/success" if row.success else "gap/failure", gap, 1.0)


class Distill(Objective):
    """``loss.kind=distill``: the teacher's token-level targets, on rows with a context."""

    name = "distill"
    needs_teacher = True
    min_group_size = 2
    reports = ("gap/success", "gap/failure")

    @classmethod
    def required_group_size(cls, config: Config) -> int:
        # Peers come from the rollout's own group; a plain-question teacher (OPD) needs none.
        return cls.min_group_size if config.teacher.use_context else 1

    def rows(self, batch: StepBatch) -> list[Row]:
        return batch.with_context

    def normalisers(self, batch: StepBatch) -> dict[str, float]:
        return distill_normalisers(self.config, self.rows(batch))

    def terms(self, norms: Mapping[str, float]) -> tuple[str, ...]:
        return ("distill",) if norms[ROWS] else ()

    def teacher_requests(self, rows: Sequence[Row]) -> list[TeacherRequest]:
        return context_requests(rows)

    def loss(
        self, forward: StudentForward, norms: Mapping[str, float], scorers: Scorers, log: StepLog
    ) -> Tensor:
        return distill_term(self.config, forward, norms, log)


class DistillFailures(Distill):
    """``loss.kind=distill-failures``: distil only failed rollouts (with a context).

    Successes keep their tokens: the teacher may only correct what the verifier rejected,
    so a teacher that reads peers badly cannot pull successes down or lengthen them.
    """

    name = "distill-failures"

    def rows(self, batch: StepBatch) -> list[Row]:
        return [r for r in batch.with_context if not r.success]
