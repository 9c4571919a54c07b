"""On-policy DPO: summed log-probs of each pair against a frozen copy of the initial student."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mopd.core.baselines import dpo_loss, sequence_logprobs
from mopd.core.losses import token_logprobs
from mopd.objectives.batch import Scorers, StudentForward
from mopd.objectives.pairs import PairObjective


class Dpo(PairObjective):
    """``loss.kind=dpo`` (``loss.beta``)."""

    name = "dpo"
    needs_reference = True

    def pair_loss(
        self, forward: StudentForward, pairs: Sequence[tuple[int, int]], scorers: Scorers
    ) -> Tensor:
        mask_BR, ids_BR = forward.mask_BR, forward.batch.response_ids
        policy_B = sequence_logprobs(forward.logprobs(), mask_BR, length_normalize=False)
        ref_logp_BR = token_logprobs(scorers.reference_logits(forward.batch), ids_BR)
        ref_B = sequence_logprobs(ref_logp_BR, mask_BR, length_normalize=False)
        return dpo_loss(policy_B, ref_B, pairs, beta=self.config.loss.beta)
