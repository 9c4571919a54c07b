"""Multiple choice: the chosen letter must equal the key.

Data rows (JSONL/Parquet): `{"question": str, "choices": [str, ...], "answer": "B"}`
(`answer` may also be the 0-based index of the right choice). The prompt lists the choices
as "A. ...", "B. ..." and asks for `<answer>X</answer>`.

Verifier: the letter inside the last `<answer>...</answer>` tag; without a tag, the last
standalone capital letter among the choices' letters (e.g. "... so the answer is C.").
Exact match, reward 1.0 or 0.0; the feedback never names the key.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from mopd.tasks.base import FixedSplits
from mopd.tasks.data import DataError, field_of, load_rows, split_rows
from mopd.types import Problem, Verdict

__all__ = ["MultipleChoiceTask", "extract_choice"]

_TAG = re.compile(r"<answer>\s*\(?([A-Za-z])\)?\s*</answer>", re.IGNORECASE)


def extract_choice(response: str, letters: str) -> str | None:
    """The chosen letter (upper case) or None."""
    tags = _TAG.findall(response)
    if tags:
        return str(tags[-1]).upper()
    bare = re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", response)
    return str(bare[-1]) if bare else None


@dataclass(frozen=True)
class MultipleChoiceTask(FixedSplits):
    """Multiple-choice questions from a JSONL/Parquet file (`data`), seeded train/eval split."""

    data: str
    n_eval: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for row in load_rows(self.data):
            question = field_of(row, "question", str)
            choices = field_of(row, "choices", list)
            if not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{row.where}: field 'choices' must be 2..26 strings")
            letters = string.ascii_uppercase[: len(choices)]
            key = field_of(row, "answer", (str, int))
            if isinstance(key, int):
                key = letters[key] if 0 <= key < len(choices) else ""
            if key not in letters or not key:
                raise DataError(f"{row.where}: field 'answer' must be one of {list(letters)}")
            listed = "\n".join(f"{letter}. {c}" for letter, c in zip(letters, choices, strict=True))
            ident = field_of(row, "id", (str, int), optional=True)
            problems.append(
                Problem(
                    id=str(ident if ident is not None else f"mcq-{row.line}"),
                    messages=(
                        {
                            "role": "user",
                            "content": f"{question}\n\n{listed}\n\nReply with the letter of "
                            "the correct choice as <answer>X</answer>.",
                        },
                    ),
                    answer=key,
                    meta={"letters": letters},
                )
            )
        train, evals = split_rows(problems, self.n_eval, self.seed)
        self._set_splits(train, evals)

    @property
    def name(self) -> str:
        return "mcq"

    def verify(self, problem: Problem, response: str) -> Verdict:
        choice = extract_choice(response, str(problem.meta.get("letters", string.ascii_uppercase)))
        if choice is None:
            return Verdict(0.0, "No answer letter was found; end with <answer>X</answer>.")
        if choice == problem.answer:
            return Verdict(1.0)
        return Verdict(0.0, f"The chosen answer {choice} is wrong.")
