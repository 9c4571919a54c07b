"""What a rollout engine is: token ids in, sampled responses with their log-probs out.

A training step asks the engine for G samples per prompt from the current student
(method step 2). The engine must report, for every response token, its log-probability
under the distribution it was *actually* drawn from, i.e. after temperature scaling and
top-p filtering. Those are the "old" log-probs of importance weights and PPO ratios, so
an engine that reports raw-model log-probs while sampling from a filtered distribution
would silently bias every estimator downstream.

Conventions shared by all engines:

- `response_ids` run up to and including the first EOS token when one was produced, and
  contain nothing after it; `truncated` is True exactly when `max_new_tokens` was reached
  without EOS.
- `text` is the decoded response with special tokens (EOS included) skipped.
- Same seed, same weights, same inputs -> the same rollouts (bitwise on CPU; GPU kernels
  may add nondeterminism an engine cannot remove).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mopd.types import Rollout

__all__ = ["RolloutEngine", "SamplingParams", "check_generate_args"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the student's distribution at `temperature`, optionally top-p filtered.

    The paper samples training rollouts at temperature 1.0 without filtering and evaluates
    at temperature 0.6, top-p 0.95. Top-k is deliberately absent: no recipe uses it, and
    every engine must then agree on one fewer knob.
    """

    temperature: float = 1.0  # > 0; greedy decoding is not a sampling distribution
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1.0 keeps the whole vocabulary
    max_new_tokens: int = 256  # >= 1

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(
                f"SamplingParams.temperature must be a number, got {self.temperature!r}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                "SamplingParams.temperature must be a finite number > 0 "
                f"(use a small value such as 0.01 for near-greedy sampling), got {self.temperature!r}"
            )
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"SamplingParams.top_p must be a number, got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise ValueError(
                f"SamplingParams.top_p must be in (0, 1] (1.0 disables nucleus filtering), got {self.top_p!r}"
            )
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(
                f"SamplingParams.max_new_tokens must be an int, got {self.max_new_tokens!r}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens!r}"
            )


def check_generate_args(prompts: Sequence[Sequence[int]], n: int) -> None:
    """The argument checks every engine's `generate` starts with."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (responses per prompt) must be an int >= 1, got {n!r}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses from the student policy."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int,
        params: SamplingParams,
        seed: int,
    ) -> list[list[Rollout]]:
        """Sample `n` responses for each prompt.

        Args:
            prompts: P prompts as token ids (chat template already applied).
            n: responses per prompt (the group size G), >= 1.
            params: temperature, top-p and length limit.
            seed: sampling seed; same seed and weights reproduce the same rollouts.

        Returns:
            P lists of `n` rollouts, in prompt order.
        """
        ...

    def update_weights(self, model: Any) -> None:
        """Make subsequent samples come from `model`'s current weights.

        Engines that keep their own copy of the weights (an inference server) copy them
        here after every optimizer step; engines that read the live training module have
        nothing to do.
        """
        ...


# Progress of long generations without widening the engine protocol: a caller that shows
# a progress bar installs a callback; engines that sample in chunks report each chunk.
_ROWS_DONE: ContextVar[Callable[[int], object] | None] = ContextVar("rows_done", default=None)


@contextmanager
def reporting_rows(callback: Callable[[int], object]) -> Iterator[None]:
    """Within the block, `callback(count)` hears of every `count` responses sampled."""
    token = _ROWS_DONE.set(callback)
    try:
        yield
    finally:
        _ROWS_DONE.reset(token)


def rows_done(count: int) -> None:
    """Called by engines after sampling `count` responses; a no-op unless reported."""
    callback = _ROWS_DONE.get()
    if callback is not None:
        callback(count)


@contextmanager
def sampling_bar(label: str | None, total: int) -> Iterator[None]:
    """A progress bar (stderr) over `total` responses sampled in the block; None: silent."""
    from tqdm.auto import tqdm

    with (
        tqdm(total=total, desc=label, unit="sample", disable=label is None, leave=False) as bar,
        reporting_rows(bar.update),
    ):
        yield
