"""Verified-success SFT (rejection sampling fine-tuning): token-mean NLL of the successes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mopd.core.baselines import sft_loss
from mopd.objectives.base import Objective, StepLog
from mopd.objectives.batch import Row, Scorers, StepBatch, StudentForward


class Sft(Objective):
    """``loss.kind=sft``: only rollouts the verifier accepted are trained on."""

    name = "sft"

    def rows(self, batch: StepBatch) -> list[Row]:
        return [r for r in batch.rows if r.success]

    def normalisers(self, batch: StepBatch) -> dict[str, float]:
        return {"sft": sum(r.tokens for r in self.rows(batch))}

    def loss(
        self, forward: StudentForward, norms: Mapping[str, float], scorers: Scorers, log: StepLog
    ) -> Tensor:
        success_B = torch.tensor([r.success for r in forward.rows], device=forward.mask_BR.device)
        loss = sft_loss(forward.logprobs(), forward.mask_BR, success_B, denominator=norms["sft"])
        log.losses["sft"] += float(loss.detach())
        return loss
