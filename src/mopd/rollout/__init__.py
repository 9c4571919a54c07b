"""Rollout engines: sample G responses per prompt from the student, with sampling log-probs.

`HFRolloutEngine` is imported lazily so that `import mopd.rollout` (for the protocol and
`SamplingParams`) does not load transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mopd.rollout.base import RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from mopd.rollout.hf import HFRolloutEngine

__all__ = ["HFRolloutEngine", "RolloutEngine", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "HFRolloutEngine":
        from mopd.rollout.hf import HFRolloutEngine

        return HFRolloutEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
