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
from typing import Protocol, runtime_checkable

from mopd.types import Problem, Verdict

__all__ = ["Task", "verify_batch"]


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

    Sequential for now; this is the single place a parallel or sandboxed executor will
    plug in. Rewards outside [0, 1] are rejected here so that a faulty plugin verifier
    fails loudly instead of skewing success rates.
    """
    if len(problems) != len(responses):
        raise ValueError(
            f"verify_batch got {len(problems)} problems but {len(responses)} responses; "
            "pass one response per problem (repeat a problem for each of its rollouts)"
        )
    verdicts = []
    for problem, response in zip(problems, responses, strict=True):
        verdict = task.verify(problem, response)
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
