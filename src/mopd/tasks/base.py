"""What a task is: problems for the student plus a verifier that scores responses.

A task owns both its data and its reward (method step 3): the trainer asks for training
and evaluation problems, renders their chat messages, samples responses, and hands each
response back to `verify`, which returns a `Verdict` with a reward in [0, 1] and optional
feedback text. Success is decided later by the trainer (`reward >= success_threshold`),
so verifiers that give partial credit need no special casing here.

Tasks never import torch: verifiers run in worker processes and sandboxes that should
not pay for the deep-learning stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mopd.types import Problem, Verdict

__all__ = ["Task", "verify_batch"]


@dataclass(frozen=True)
class FixedSplits:
    """Base of the built-in tasks: train and eval problems fixed when the task is built."""

    _train: tuple[Problem, ...] = field(init=False, repr=False, compare=False)
    _eval: tuple[Problem, ...] = field(init=False, repr=False, compare=False)

    def _set_splits(self, train: Sequence[Problem], evals: Sequence[Problem]) -> None:
        object.__setattr__(self, "_train", tuple(train))
        object.__setattr__(self, "_eval", tuple(evals))

    def train_problems(self) -> Sequence[Problem]:
        return self._train

    def eval_problems(self) -> Sequence[Problem]:
        return self._eval


@runtime_checkable
class Task(Protocol):
    """A source of problems with a verifier. Implement it with any class; no base class needed."""

    @property
    def name(self) -> str:
        """Short identifier used in logs and run folders, e.g. "arithmetic"."""
        ...

    def train_problems(self) -> Sequence[Problem]:
        """Problems to train on, in a fixed order (the trainer shuffles with the run seed)."""
        ...

    def eval_problems(self) -> Sequence[Problem]:
        """Held-out problems, disjoint from the training ones."""
        ...

    def verify(self, problem: Problem, response: str) -> Verdict:
        """Score one decoded response: reward in [0, 1], optional feedback text."""
        ...


def verify_batch(
    task: Task, problems: Sequence[Problem], responses: Sequence[str]
) -> list[Verdict]:
    """Verify `responses[i]` against `problems[i]` for every i, in order.

    A task that defines its own `verify_batch(problems, responses)` (e.g. to run sandboxed
    programs on a bounded pool) is called once for the whole batch; otherwise `verify` is
    called per pair. Results are validated here either way: a verdict that is not a
    `Verdict`, a wrong count, or a reward outside [0, 1] fails loudly instead of skewing
    success rates.
    """
    if len(problems) != len(responses):
        raise ValueError(
            f"verify_batch got {len(problems)} problems but {len(responses)} responses; "
            "pass one response per problem (repeat a problem for each of its rollouts)"
        )
    batched = getattr(task, "verify_batch", None)
    if callable(batched):
        results = list(batched(problems, responses))
        if len(results) != len(problems):
            raise ValueError(
                f"task {task.name!r} returned {len(results)} verdicts from verify_batch() "
                f"for {len(problems)} responses"
            )
    else:
        results = [task.verify(p, r) for p, r in zip(problems, responses, strict=True)]
    verdicts = []
    for problem, verdict in zip(problems, results, strict=True):
        if not isinstance(verdict, Verdict):
            raise TypeError(
                f"task {task.name!r} returned {type(verdict).__name__} from verify() for "
                f"problem {problem.id!r}; it must return mopd.types.Verdict"
            )
        # The comparison is False for NaN too.
        if not (isinstance(verdict.reward, (int, float)) and 0.0 <= verdict.reward <= 1.0):
            raise ValueError(
                f"task {task.name!r} returned reward {verdict.reward!r} for problem "
                f"{problem.id!r}; rewards must be numbers in [0, 1]"
            )
        verdicts.append(verdict)
    return verdicts
