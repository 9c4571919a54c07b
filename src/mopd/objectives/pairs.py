"""On-policy preference objectives: pairs of rollouts of one prompt, ranked by reward.

Every (chosen, rejected) pair of one group with a strictly higher reward for the chosen
rollout; one group is one micro-batch, and each group's mean pair loss is reweighted so
that the step's loss is the mean over all of its pairs (all processes).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence

from torch import Tensor

from mopd.core.baselines import preference_pairs
from mopd.objectives.base import Objective, StepLog
from mopd.objectives.batch import Row, Scorers, StepBatch, StudentForward


def _pairs(rows: Sequence[Row]) -> list[tuple[int, int]]:
    return preference_pairs([r.reward for r in rows])


class PairObjective(Objective):
    """Shared by DPO and SimPO: which rows, which micro-batches, which normaliser."""

    min_group_size = 2

    def rows(self, batch: StepBatch) -> list[Row]:
        return [r for group in batch.groups if _pairs(group) for r in group]

    def normalisers(self, batch: StepBatch) -> dict[str, float]:
        return {"pairs": sum(len(_pairs(group)) for group in batch.groups)}

    def micro_batches(self, batch: StepBatch, norms: Mapping[str, float]) -> list[Sequence[Row]]:
        return [group for group in batch.groups if _pairs(group)]

    def loss(
        self, forward: StudentForward, norms: Mapping[str, float], scorers: Scorers, log: StepLog
    ) -> Tensor:
        pairs = _pairs(forward.rows)
        loss = self.pair_loss(forward, pairs, scorers)
        share = len(pairs) / norms["pairs"]  # the group's pair mean -> the step's pair mean
        log.losses[self.name] += float(loss.detach()) * share
        return loss * share

    @abstractmethod
    def pair_loss(
        self, forward: StudentForward, pairs: Sequence[tuple[int, int]], scorers: Scorers
    ) -> Tensor:
        """Mean loss over the group's `pairs` (row indices of `forward`)."""
