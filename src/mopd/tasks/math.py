"""Math with a final answer checked for symbolic equivalence (`math-verify`).

Data rows (JSONL/Parquet): `{"question": str, "answer": str}`; the answer is LaTeX or plain
text, e.g. "\\frac{1}{2}", "0.5", "x^2+1".

Verifier: the final answer is the content of the last `\\boxed{...}` (nested braces
allowed), else the number after the last "#### ", else what follows the last "Answer:".
A reply without one (for example cut off by the token limit before it wrote the answer)
scores 0 with feedback saying so; a reply that is cut off after its answer is still
scored. Gold and prediction are parsed by `math-verify` and compared symbolically, so
`\\frac{1}{2}`, `0.5` and `1/2` are equal while `0.51` is not. Each comparison has a
timeout (`timeout_seconds`, via SIGALRM, hence only in the main thread; in other threads
it runs without one). Anything math-verify cannot parse counts as a wrong answer.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from mopd.tasks.base import FixedSplits
from mopd.tasks.data import field_of, load_rows, split_rows
from mopd.types import Problem, Verdict

__all__ = ["MathTask", "extract_final_answer", "math_equal"]

_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:=]\s*([^\n]+)", re.IGNORECASE)
_PROMPT = "{question}\n\nPut the final answer in \\boxed{{}}."


def extract_final_answer(response: str) -> str | None:
    """The final answer written in `response`, or None (see the module docstring)."""
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES, _ANSWER_LINE):
        found = pattern.findall(response)
        if found:
            return str(found[-1]).strip().rstrip(".").strip("$ ") or None
    return None


def math_equal(gold: str, predicted: str, timeout_seconds: int = 5) -> bool:
    """Symbolic equivalence of two answers; False when either cannot be parsed or on timeout."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:  # a declared dependency; say so if it is missing
        raise ImportError("the math task needs math-verify: pip install 'mopd'") from exc
    main = threading.current_thread() is threading.main_thread()
    limit = timeout_seconds if main else None
    gold_expr = parse(f"${gold}$", parsing_timeout=limit)  # type: ignore[arg-type]
    pred_expr = parse(f"${predicted}$", parsing_timeout=limit)  # type: ignore[arg-type]
    if not gold_expr or not pred_expr:
        return False
    return bool(verify(gold_expr, pred_expr, timeout_seconds=limit))


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip() or None
        i += 1
    return None  # unclosed: the reply was cut off inside the box


@dataclass(frozen=True)
class MathTask(FixedSplits):
    """Math problems from a JSONL/Parquet file (`data`), checked with math-verify."""

    data: str
    n_eval: int = 0
    seed: int = 0
    timeout_seconds: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.timeout_seconds, int) or self.timeout_seconds < 1:
            raise ValueError(
                f"MathTask.timeout_seconds must be an int >= 1, got {self.timeout_seconds!r}"
            )
        problems = []
        for row in load_rows(self.data):
            question = field_of(row, "question", str)
            answer = field_of(row, "answer", (str, int, float))
            ident = field_of(row, "id", (str, int), optional=True)
            problems.append(
                Problem(
                    id=str(ident if ident is not None else f"math-{row.line}"),
                    messages=({"role": "user", "content": _PROMPT.format(question=question)},),
                    answer=str(answer),
                )
            )
        train, evals = split_rows(problems, self.n_eval, self.seed)
        self._set_splits(train, evals)

    @property
    def name(self) -> str:
        return "math"

    def verify(self, problem: Problem, response: str) -> Verdict:
        predicted = extract_final_answer(response)
        if predicted is None:
            return Verdict(0.0, "No final answer was found; put it in \\boxed{}.")
        if math_equal(str(problem.answer), predicted, self.timeout_seconds):
            return Verdict(1.0)
        return Verdict(0.0, "The final answer is wrong.")
