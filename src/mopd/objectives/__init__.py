"""Training objectives: one class per ``loss.kind``, looked up in :data:`REGISTRY`.

Config validation, the CLI, model building (teacher? reference?), sampling (teacher
inputs?) and the training step all ask the registry; nothing else names a loss kind.
To add an objective, write a subclass of :class:`Objective` (see ``objectives/base.py``)
and register it here, or at run time with ``REGISTRY["name"] = MyObjective``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mopd.config import ConfigError
from mopd.objectives.base import Objective, StepLog
from mopd.objectives.batch import Row, Scorers, StepBatch, StudentForward, assemble_batch
from mopd.objectives.credit import ContrastiveCredit, SignedCredit, SignScaled
from mopd.objectives.distill import Distill, DistillFailures
from mopd.objectives.dpo import Dpo
from mopd.objectives.grpo import Grpo
from mopd.objectives.grpo_distill import GrpoDistill
from mopd.objectives.sft import Sft
from mopd.objectives.simpo import Simpo

if TYPE_CHECKING:
    from mopd.config import Config

REGISTRY: dict[str, type[Objective]] = {
    "distill": Distill,
    "distill-failures": DistillFailures,
    "signed-credit": SignedCredit,
    "sign-scaled": SignScaled,
    "contrastive-credit": ContrastiveCredit,
    "grpo": Grpo,
    "grpo+distill": GrpoDistill,
    "sft": Sft,
    "dpo": Dpo,
    "simpo": Simpo,
}


def objective_class(kind: str) -> type[Objective]:
    """The class registered for ``loss.kind`` `kind`."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ConfigError(f"loss.kind: got {kind!r}, expected one of {sorted(REGISTRY)}") from None


def build_objective(config: Config) -> Objective:
    return objective_class(config.loss.kind)(config)


__all__ = [
    "REGISTRY",
    "Objective",
    "Row",
    "Scorers",
    "StepBatch",
    "StepLog",
    "StudentForward",
    "assemble_batch",
    "build_objective",
    "objective_class",
]
