"""GRPO with sign-safe peer credit: the verifier signs every token's update, the
peer-conditioned teacher only redistributes it over the rollout's tokens.

``signed-credit`` (RLSD-style) and ``contrastive-credit`` (RLCSD-style) keep GRPO's rows,
denominator and PPO-clip surrogate, and replace the rollout's one advantage by per-token
advantages from `core.credit` (the maths and why it is sign-safe). Teacher log-probs are
read at the distillation temperature (`loss.temperature`, default the rollout's), the
student's likewise; rows the teacher cannot score (no context, no contrast pair) keep the
plain group advantage. ``sign-scaled`` is signed-credit's control without a teacher.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mopd.core.credit import contrastive_credit, sign_scaled_credit, signed_teacher_credit
from mopd.core.losses import token_logprobs
from mopd.objectives.base import StepLog
from mopd.objectives.batch import Row, Scorers, StudentForward, TeacherRequest
from mopd.objectives.distill import context_requests, loss_temperature, record_signal
from mopd.objectives.grpo import Grpo, grpo_term, row_advantages


def _teacher_logprobs(forward: StudentForward, temperature: float) -> Tensor:
    """Log-probs of the rows' tokens under each teacher request.  # (N, R), no grad"""
    assert forward.teacher_BRV is not None
    ids_NR = forward.batch.response_ids[forward.teacher_index]
    return token_logprobs(forward.teacher_BRV, ids_NR, temperature=temperature)


class _CreditObjective(Grpo):
    """GRPO's rows, normaliser and checks; subclasses give the per-token advantages."""

    needs_teacher = True
    reports = (*Grpo.reports, "credit/weight_mean")

    def loss(
        self, forward: StudentForward, norms: Mapping[str, float], scorers: Scorers, log: StepLog
    ) -> Tensor:
        adv_BR = self.token_advantages(forward, log)
        loss = grpo_term(self.config, forward, norms, log, adv_BR, term=self.name)
        with torch.no_grad():  # how far the credit moved the advantages: mean A_t / A
            adv_B1 = row_advantages(forward).to(adv_BR.dtype).unsqueeze(-1)
            mask_BR = forward.mask_BR != 0
            ratio_BR = torch.where(mask_BR, adv_BR / adv_B1, 0.0)
            log.add_ratio("credit/weight_mean", float(ratio_BR.sum()), float(mask_BR.sum()))
        return loss

    @abstractmethod
    def token_advantages(self, forward: StudentForward, log: StepLog) -> Tensor:
        """Per-token advantages of the forward's rows (`log`: for signal metrics).  # (B, R)"""


class SignedCredit(_CreditObjective):
    """``loss.kind=signed-credit``: ``A * clip((p_T / p_S)^sign(A), 1 +- loss.credit_clip)``."""

    name = "signed-credit"
    reports = (*_CreditObjective.reports, "credit/clipped_fraction")

    def teacher_requests(self, rows: Sequence[Row]) -> list[TeacherRequest]:
        return context_requests(rows)

    def token_advantages(self, forward: StudentForward, log: StepLog) -> Tensor:
        temp = loss_temperature(self.config)
        student_BR = forward.sampling_logprobs(temp)
        teacher_BR = student_BR.clone()  # no context: ratio 1, the plain advantage
        if index := forward.teacher_index:
            teacher_BR[index] = _teacher_logprobs(forward, temp)
            rows = [forward.rows[i] for i in index]
            mask_NR = forward.mask_BR[index]
            record_signal(log, rows, teacher_BR[index], student_BR[index], mask_NR)
        adv_B = row_advantages(forward).to(student_BR.dtype)
        clip = self.config.loss.credit_clip
        adv_BR = signed_teacher_credit(adv_B, teacher_BR, student_BR, clip=clip)
        with torch.no_grad():  # how often the teacher's ratio is cut: then only its sign counts
            counted_BR = (forward.mask_BR != 0) & (adv_B != 0).unsqueeze(-1)
            weight_BR = adv_BR / torch.where(adv_B == 0, 1.0, adv_B).unsqueeze(-1)
            cut_BR = counted_BR & ((weight_BR - 1).abs() >= clip * (1 - 1e-4))
            log.add_ratio("credit/clipped_fraction", float(cut_BR.sum()), float(counted_BR.sum()))
        return adv_BR


class SignScaled(_CreditObjective):
    """``loss.kind=sign-scaled``: signed-credit's control without a teacher, GRPO with
    ``A (1 - loss.credit_clip)`` on successes and ``A (1 + loss.credit_clip)`` on
    failures (`core.credit.sign_scaled_credit`)."""

    name = "sign-scaled"
    needs_teacher = False

    def token_advantages(self, forward: StudentForward, log: StepLog) -> Tensor:
        adv_B = row_advantages(forward).to(forward.mask_BR.dtype)
        width = forward.mask_BR.shape[1]
        return sign_scaled_credit(adv_B, width, clip=self.config.loss.credit_clip)


class ContrastiveCredit(_CreditObjective):
    """``loss.kind=contrastive-credit``: ``A + scale tanh((log p_T(y|success) - log p_T(y|failure)) / tau)``,
    sign-clamped to A; the two one-peer prompts of each row go in one teacher call."""

    name = "contrastive-credit"
    needs_contrast = True

    def teacher_requests(self, rows: Sequence[Row]) -> list[TeacherRequest]:
        requests: list[TeacherRequest] = []
        for i, row in enumerate(rows):
            pair = row.teacher.contrast_ids if row.teacher is not None else None
            if pair is not None:
                requests += [(i, pair[0]), (i, pair[1])]
        return requests

    def token_advantages(self, forward: StudentForward, log: StepLog) -> Tensor:
        loss = self.config.loss
        adv_B = row_advantages(forward).to(forward.mask_BR.dtype)
        success_BR = forward.mask_BR.new_zeros(forward.mask_BR.shape)
        failure_BR = success_BR.clone()  # equal: no contrast, the plain advantage
        if forward.teacher_index:
            logp_NR = _teacher_logprobs(forward, loss_temperature(self.config))
            rows = forward.teacher_index[::2]  # requests come in (success, failure) pairs
            success_BR[rows], failure_BR[rows] = logp_NR[0::2], logp_NR[1::2]
        return contrastive_credit(
            adv_B,
            success_BR,
            failure_BR,
            tau=loss.contrast_tau,
            scale=loss.contrast_scale,
            threshold=loss.contrast_threshold,
        )
