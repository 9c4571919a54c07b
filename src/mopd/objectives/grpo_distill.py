"""GRPO plus distillation: ``(1 - lambda) * GRPO + lambda * distill``, lambda = loss.grpo_mix.

The reward term keeps the verifier's sign on every rollout of a mixed group; the
distillation term adds the teacher's token-level targets on rows with a context. Both
terms read ONE student forward per micro-batch: its rows are those either term trains,
and the distillation term scores the subset with a context. Each term keeps its own
denominator over the step, so the mix is exactly the weighted sum of the two pure
objectives' losses (and gradients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from mopd.config import Config, ConfigError
from mopd.core.baselines import mixed_loss
from mopd.objectives.base import Objective, StepLog
from mopd.objectives.batch import Row, Scorers, StepBatch, StudentForward, TeacherRequest
from mopd.objectives.distill import (
    ROWS,
    Distill,
    context_requests,
    distill_normalisers,
    distill_term,
)
from mopd.objectives.grpo import Grpo, grpo_normalisers, grpo_term


class GrpoDistill(Objective):
    """``loss.kind=grpo+distill``."""

    name = "grpo+distill"
    needs_teacher = True
    min_group_size = 2
    reports = (*Grpo.reports, *Distill.reports)

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        if not config.loss.grpo_mix > 0:
            raise ConfigError(
                "loss.grpo_mix: loss.kind=grpo+distill needs the distillation weight lambda in (0, 1], "
                "e.g. loss.grpo_mix=0.5 (lambda = 0 is loss.kind=grpo)",
            )

    def rows(self, batch: StepBatch) -> list[Row]:
        return [r for r in batch.rows if r.has_context or r.advantage != 0.0]

    def normalisers(self, batch: StepBatch) -> dict[str, float]:
        distilled = distill_normalisers(self.config, batch.with_context)
        return {**grpo_normalisers(self.config, batch), **distilled}

    def terms(self, norms: Mapping[str, float]) -> tuple[str, ...]:
        return ("grpo", "distill") if norms[ROWS] else ("grpo",)

    def teacher_requests(self, rows: Sequence[Row]) -> list[TeacherRequest]:
        return context_requests(rows)

    def loss(
        self, forward: StudentForward, norms: Mapping[str, float], scorers: Scorers, log: StepLog
    ) -> Tensor:
        grpo = grpo_term(self.config, forward, norms, log)
        distill = (
            distill_term(self.config, forward, norms, log)
            if forward.teacher_index
            else grpo.new_zeros(())
        )
        return mixed_loss(grpo, distill, self.config.loss.grpo_mix)
