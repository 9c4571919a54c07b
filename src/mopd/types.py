"""Small immutable records that flow through a training step.

Kept free of torch so that tasks and verifiers can import them without the
deep-learning stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One prompt of a task: chat messages for the student plus what the verifier needs."""

    id: str
    messages: tuple[Mapping[str, str], ...]  # [{"role": "user", "content": ...}, ...]
    answer: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """Text of the last user message: what the teacher prompt repeats."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message["content"]
        raise ValueError(f"problem {self.id!r} has no user message")


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one response."""

    reward: float  # in [0, 1]
    feedback: str | None = None  # environment feedback text, shown to the teacher if enabled
    info: Mapping[str, float] = field(default_factory=dict)  # e.g. {"pass_fraction": 0.5}


@dataclass(frozen=True)
class Rollout:
    """One sampled response of the student."""

    response_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log-prob of each response token under the sampling distribution
    text: str
    truncated: bool = False  # hit max_new_tokens before EOS


@dataclass(frozen=True)
class PeerContext:
    """Which peers a rollout's teacher sees.

    `successes` and `failures` are indices into the rollout's own group, in display
    order. `foreign_successes` holds (group, index) pairs from *other* prompts of the
    batch; only the `unrelated_prompt` control fills it, and those are shown after
    `successes` in the success slots.
    """

    successes: tuple[int, ...] = ()
    failures: tuple[int, ...] = ()
    use_feedback: bool = False
    foreign_successes: tuple[tuple[int, int], ...] = ()

    @property
    def n_blocks(self) -> int:
        return (
            len(self.successes)
            + len(self.failures)
            + len(self.foreign_successes)
            + int(self.use_feedback)
        )

    @property
    def is_empty(self) -> bool:
        """True when the teacher sees the plain question: such a rollout gets no distillation loss."""
        return self.n_blocks == 0
