"""Procedural integer arithmetic: the offline demo task.

Problems are expressions such as `37 - 4 * 12` over `terms` operands drawn uniformly from
0 .. 10**digits - 1 (so "digits" is the maximum number of digits) joined by operators
drawn from `operators` (any of `+ - *`, usual precedence). Each distinct expression is
one point of a space of (10**digits)**terms * len(operators)**(terms - 1) problems; the
task samples n_train + n_eval distinct points with `random.Random(seed)` and splits them,
so the train and eval splits never share an expression. A space too small for the
request is an error rather than a silent duplicate.

Verifier: the last number in the reply (negative numbers and thousands separators such
as 1,234 allowed; 8.0 counts as 8) must equal the answer: reward 1.0, else 0.0. Taking
the last number tolerates working shown before the result, at the price of accepting a
reply that happens to end with the right number after wrong reasoning.
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from mopd.tasks.base import FixedSplits
from mopd.types import Problem, Verdict

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "ArithmeticTask", "last_number"]

DEFAULT_PROMPT_TEMPLATE = "What is {expression}? Reply with the final answer as a number."
_SUPPORTED_OPERATORS = "+-*"

# A number not glued to a preceding word or decimal point: optional minus, digits with
# optional comma groups of three, optional decimal part.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w)", re.ASCII)

# Feedback is shown to the teacher when environment feedback is enabled, next to the
# failed response. It must never contain the expected answer: the teacher would then
# simply copy it, and the distillation signal would teach "know the answer" rather than
# "compute it".
_FEEDBACK_NO_NUMBER = "The expected answer was not found: the reply contains no number."
_FEEDBACK_WRONG = "The expected answer was not found: the last number in the reply is wrong."


def last_number(text: str) -> Decimal | None:
    """The last number written in `text`, or None. Commas between digit groups are ignored."""
    matches = _NUMBER.findall(text.replace("\u2212", "-"))  # Unicode minus sign
    return Decimal(matches[-1].replace(",", "")) if matches else None


def _evaluate(operands: Sequence[int], operators: Sequence[str]) -> int:
    """Value of operands[0] op[0] operands[1] ..., with `*` binding tighter than `+`/`-`."""
    total, sign, product = 0, 1, operands[0]
    for op, operand in zip(operators, operands[1:], strict=True):
        if op == "*":
            product *= operand
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), operand
    return total + sign * product


@dataclass(frozen=True)
class ArithmeticTask(FixedSplits):
    """Integer arithmetic expressions with an exact-match verifier.

    Args:
        digits: operands are drawn from 0 .. 10**digits - 1.
        terms: operands per expression, >= 2.
        operators: allowed operators, a subset of "+-*", e.g. "+-".
        n_train, n_eval: sizes of the two disjoint splits. The defaults split the 100
            one-digit additions 80/20: the packaged 135M student solves about half of
            them, which gives groups with both successes and failures.
        seed: seed of the problem generator (independent of the training seed).
        prompt_template: user message; `{expression}` is replaced by the expression.
    """

    digits: int = 1
    terms: int = 2
    operators: str = "+"
    n_train: int = 80
    n_eval: int = 20
    seed: int = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    def __post_init__(self) -> None:
        for name, minimum in (("digits", 1), ("terms", 2), ("n_train", 0), ("n_eval", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"ArithmeticTask.{name} must be an int >= {minimum}, got {value!r}"
                )
        if self.n_train + self.n_eval == 0:
            raise ValueError("ArithmeticTask.n_train and n_eval are both 0: no problems to make")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"ArithmeticTask.seed must be an int, got {self.seed!r}")
        if (
            not isinstance(self.operators, str)
            or not self.operators
            or any(op not in _SUPPORTED_OPERATORS for op in self.operators)
            or len(set(self.operators)) != len(self.operators)
        ):
            raise ValueError(
                "ArithmeticTask.operators must be a non-empty string of distinct characters "
                f"from {_SUPPORTED_OPERATORS!r}, e.g. '+-', got {self.operators!r}"
            )
        try:
            rendered = self.prompt_template.format(expression="\x00")
        except (AttributeError, KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                "ArithmeticTask.prompt_template must be a str whose only placeholder is "
                f"{{expression}}, got {self.prompt_template!r} ({type(exc).__name__}: {exc})"
            ) from None
        if "\x00" not in rendered:
            raise ValueError(
                "ArithmeticTask.prompt_template must contain {expression}, got "
                f"{self.prompt_template!r}"
            )
        if self.space_size < self.n_train + self.n_eval:
            raise ValueError(
                f"ArithmeticTask with digits={self.digits}, terms={self.terms}, "
                f"operators={self.operators!r} has only {self.space_size} distinct problems, "
                f"fewer than n_train + n_eval = {self.n_train + self.n_eval}; raise digits or "
                "terms, add operators, or ask for fewer problems"
            )
        indices = self._sample_indices(self.n_train + self.n_eval)
        train = tuple(
            self._problem("train", i, idx) for i, idx in enumerate(indices[: self.n_train])
        )
        evals = tuple(
            self._problem("eval", i, idx) for i, idx in enumerate(indices[self.n_train :])
        )
        self._set_splits(train, evals)

    @property
    def name(self) -> str:
        return "arithmetic"

    @property
    def space_size(self) -> int:
        """Number of distinct expressions with these settings."""
        return (10**self.digits) ** self.terms * len(self.operators) ** (self.terms - 1)

    def verify(self, problem: Problem, response: str) -> Verdict:
        """Reward 1.0 when the last number in `response` equals `problem.answer`."""
        if not isinstance(problem.answer, int):
            raise ValueError(
                f"problem {problem.id!r} has answer {problem.answer!r}; ArithmeticTask "
                "verifies integer answers only"
            )
        value = last_number(response)
        if value is None:
            return Verdict(reward=0.0, feedback=_FEEDBACK_NO_NUMBER, info={"number_found": 0.0})
        if value == problem.answer:  # exact: Decimal compares with int without rounding
            return Verdict(reward=1.0, info={"number_found": 1.0})
        return Verdict(reward=0.0, feedback=_FEEDBACK_WRONG, info={"number_found": 1.0})

    def _sample_indices(self, k: int) -> list[int]:
        """k distinct points of the problem space, in random order."""
        rng = random.Random(self.seed)
        if self.space_size <= sys.maxsize:  # range() needs a machine-sized length
            return rng.sample(range(self.space_size), k)
        # Astronomically large space: collisions are vanishingly rare, reject them anyway.
        seen: dict[int, None] = {}
        while len(seen) < k:
            seen.setdefault(rng.randrange(self.space_size))
        return list(seen)

    def _problem(self, split: str, position: int, index: int) -> Problem:
        """Decode a point of the space (mixed radix: operands, then operators) into a Problem."""
        base = 10**self.digits
        operands: list[int] = []
        operators: list[str] = []
        for _ in range(self.terms):
            index, digit_value = divmod(index, base)
            operands.append(digit_value)
        for _ in range(self.terms - 1):
            index, op_index = divmod(index, len(self.operators))
            operators.append(self.operators[op_index])
        parts = [str(operands[0])]
        for operator, operand in zip(operators, operands[1:], strict=True):
            parts += [operator, str(operand)]
        expression = " ".join(parts)
        return Problem(
            id=f"arith-{split}-{position:04d}",
            messages=(
                {"role": "user", "content": self.prompt_template.format(expression=expression)},
            ),
            answer=_evaluate(operands, operators),
            meta={"expression": expression, "split": split},
        )
