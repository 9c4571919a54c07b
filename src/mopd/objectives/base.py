"""The interface every training objective implements, and what it reports.

An objective is one ``loss.kind``. It declares what it needs before any model loads
(a teacher? a frozen reference? how many rollouts per prompt?), which rows of a step it
trains and in which micro-batches, the normalisers it needs over the whole step, and
its loss on one micro-batch, computed from ONE student forward that all its terms share.

The step (`mopd.training.step`) owns the order of things: it sums the normalisers over
processes before the first micro-batch (so gradient accumulation gives exactly the
full-batch gradient), runs the student forward of each micro-batch, and calls
:meth:`Objective.loss`, which returns the scalar to back-propagate and records its
terms and diagnostics in the step's :class:`StepLog`.

Adding an objective: subclass :class:`Objective` in a new module, then add one line to
``mopd.objectives.REGISTRY`` (or, from outside the package, assign
``REGISTRY["name"] = MyObjective`` before loading the config).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from mopd.config import ConfigError
from mopd.objectives.batch import Row, Scorers, StepBatch, StudentForward, TeacherRequest

if TYPE_CHECKING:
    from mopd.config import Config


@dataclass
class StepLog:
    """What the objective reports during one step's micro-batches.

    ``losses``: each loss term (unweighted), summed over micro-batches; ``total`` the
    value back-propagated. ``ratios``: name -> [numerator, count], summed over
    micro-batches and processes before the metric is the ratio. ``teacher_scores``: mean
    per-token teacher log-prob of each scored rollout, keyed by (group, index).
    """

    losses: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    ratios: dict[str, list[float]] = field(default_factory=dict)
    teacher_scores: dict[tuple[int, int], float] = field(default_factory=dict)

    def add_ratio(self, name: str, numerator: float, count: float) -> None:
        pair = self.ratios.setdefault(name, [0.0, 0.0])
        pair[0] += numerator
        pair[1] += count


class Objective(ABC):
    """One ``loss.kind``: what it needs, which rows it trains, and its micro-batch loss."""

    # Registry key; also the name under which the loss is logged (``loss/<name>``).
    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False  # build teacher inputs and a teacher model
    needs_reference: ClassVar[bool] = False  # build a frozen copy of the initial student
    needs_contrast: ClassVar[bool] = False  # teacher inputs with one-success/one-failure prompts
    min_group_size: ClassVar[int] = 1  # rollout.n below this trains nothing
    reports: ClassVar[tuple[str, ...]] = ()  # ratio metrics it fills in the StepLog

    def __init__(self, config: Config) -> None:
        self.config = config

    # ------------------------------------------------------------ declarations
    @classmethod
    def required_group_size(cls, config: Config) -> int:
        """Rollouts per prompt this objective needs under `config` (default: the class's)."""
        return cls.min_group_size

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Raise :class:`ConfigError` (naming the key) for settings it cannot train with."""
        need = cls.required_group_size(config)
        if config.rollout.n < need:
            raise ConfigError(
                f"rollout.n: loss.kind={cls.name} learns from several rollouts of each prompt: "
                f"needs rollout.n >= {need}, got {config.rollout.n}",
            )

    # ------------------------------------------------------------ per step
    @abstractmethod
    def rows(self, batch: StepBatch) -> list[Row]:
        """The rows this objective back-propagates through (others add zero gradient)."""

    @abstractmethod
    def normalisers(self, batch: StepBatch) -> dict[str, float]:
        """This process's share of the step's denominators (the step sums them)."""

    def terms(self, norms: Mapping[str, float]) -> tuple[str, ...]:
        """Loss terms logged this step (given the step-wide normalisers)."""
        return (self.name,)

    def micro_batches(self, batch: StepBatch, norms: Mapping[str, float]) -> list[Sequence[Row]]:
        """The trained rows in chunks of ``train.micro_batch_size``."""
        rows = self.rows(batch) if self.terms(norms) else []
        size = self.config.train.micro_batch_size
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def teacher_requests(self, rows: Sequence[Row]) -> list[TeacherRequest]:
        """What the teacher scores for a micro-batch, before the student forward: (row
        index, teacher prompt ids) pairs, all in one batched teacher call."""
        return []

    @abstractmethod
    def loss(
        self,
        forward: StudentForward,
        norms: Mapping[str, float],
        scorers: Scorers,
        log: StepLog,
    ) -> Tensor:
        """The micro-batch's loss to back-propagate (already divided by the step's norms)."""
