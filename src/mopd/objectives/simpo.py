"""On-policy SimPO: length-normalised log-probs with a margin, no reference model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mopd.core.baselines import sequence_logprobs, simpo_loss
from mopd.objectives.batch import Scorers, StudentForward
from mopd.objectives.pairs import PairObjective


class Simpo(PairObjective):
    """``loss.kind=simpo`` (``loss.simpo_beta``, ``loss.simpo_gamma``)."""

    name = "simpo"

    def pair_loss(
        self, forward: StudentForward, pairs: Sequence[tuple[int, int]], scorers: Scorers
    ) -> Tensor:
        avg_B = sequence_logprobs(forward.logprobs(), forward.mask_BR, length_normalize=True)
        loss = self.config.loss
        return simpo_loss(avg_B, pairs, beta=loss.simpo_beta, gamma=loss.simpo_gamma)
