"""Task plugins for the learning benchmark: a validation and a test split of one task.

The built-in arithmetic task has a train and an eval split. Choosing a learning rate on
the split that is then reported would flatter every tuned method, so the benchmark cuts
the eval split in two: the first `n_validation` problems (what `mopd train` evaluates
during training, used to pick learning rates) and the remaining `n_test` (reported).
The training problems are the task's own and are disjoint from both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mopd.tasks.arithmetic import ArithmeticTask
from mopd.tasks.code import CodeTask
from mopd.types import Problem, Verdict

SPLITS = ("validation", "test")


@dataclass(frozen=True)
class HeldOutSplit:
    """`task` with its eval problems cut into validation (first part) and test (rest)."""

    task: Any
    split: str
    n_validation: int

    @property
    def name(self) -> str:
        return f"{self.task.name}-{self.split}"

    def train_problems(self) -> Sequence[Problem]:
        return self.task.train_problems()

    def eval_problems(self) -> Sequence[Problem]:
        held_out = list(self.task.eval_problems())
        return (
            held_out[: self.n_validation]
            if self.split == "validation"
            else held_out[self.n_validation :]
        )

    def verify(self, problem: Problem, response: str) -> Verdict:
        return self.task.verify(problem, response)

    def __getattr__(self, name: str) -> Any:
        """The rest of the task's interface (batched verification, sandbox limits)."""
        if name == "task" or name.startswith("__"):  # copy/pickle hooks are the wrapper's
            raise AttributeError(name)
        return getattr(self.task, name)


def _check(split: str, n_validation: int, n_test: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_validation < 1 or n_test < 1:
        raise ValueError(f"n_validation and n_test must be >= 1, got {n_validation}, {n_test}")


def make_arithmetic(
    split: str = "validation", n_validation: int = 20, n_test: int = 40, **options: Any
) -> HeldOutSplit:
    """Arithmetic with `n_validation + n_test` held-out problems; `options` as ArithmeticTask."""
    _check(split, n_validation, n_test)
    task = ArithmeticTask(n_eval=n_validation + n_test, **options)
    return HeldOutSplit(task, split, n_validation)


def make_humaneval(
    split: str = "validation", n_validation: int = 20, n_test: int = 40, **options: Any
) -> HeldOutSplit:
    """HumanEval's 164 problems (the code task, tests run in the sandbox) with
    `n_validation + n_test` held out; `options` as CodeTask."""
    _check(split, n_validation, n_test)
    task = CodeTask(source="humaneval", n_eval=n_validation + n_test, **options)
    return HeldOutSplit(task, split, n_validation)
