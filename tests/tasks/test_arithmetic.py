"""ArithmeticTask: splits, determinism, answers checked by Python's own evaluator, verifier."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from mopd.tasks import ArithmeticTask, Task, verify_batch
from mopd.types import Problem, Verdict

pytestmark = pytest.mark.unit


def _expressions(problems) -> list[str]:
    return [p.meta["expression"] for p in problems]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"digits": 2, "terms": 3, "operators": "+-*", "n_train": 300, "n_eval": 100},
        {"digits": 1, "terms": 2, "operators": "+-", "n_train": 150, "n_eval": 50},  # all 200
    ],
)
def test_train_and_eval_splits_are_disjoint_and_duplicate_free(kwargs):
    task = ArithmeticTask(**kwargs)
    train, evals = _expressions(task.train_problems()), _expressions(task.eval_problems())
    assert len(train) == task.n_train and len(evals) == task.n_eval
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)


def test_space_exactly_filled_contains_every_ordered_pair():
    task = ArithmeticTask(digits=1, terms=2, operators="+", n_train=60, n_eval=40)
    got = set(_expressions(task.train_problems())) | set(_expressions(task.eval_problems()))
    assert got == {f"{a} + {b}" for a, b in itertools.product(range(10), repeat=2)}


def test_too_small_space_is_an_error_naming_its_size():
    with pytest.raises(ValueError, match=r"only 100 distinct problems.*n_train \+ n_eval = 101"):
        ArithmeticTask(digits=1, terms=2, operators="+", n_train=60, n_eval=41)


def test_same_seed_gives_same_problems_and_other_seed_differs():
    assert ArithmeticTask(seed=3).train_problems() == ArithmeticTask(seed=3).train_problems()
    assert ArithmeticTask(seed=3).eval_problems() == ArithmeticTask(seed=3).eval_problems()
    assert _expressions(ArithmeticTask(seed=3).train_problems()) != _expressions(
        ArithmeticTask(seed=4).train_problems()
    )


@pytest.mark.parametrize(
    ("digits", "terms", "operators"),
    [(1, 2, "+"), (2, 4, "+-*"), (3, 3, "-*"), (12, 2, "+*")],  # 12 digits: space > sys.maxsize
)
def test_answers_equal_python_eval_of_the_expression(digits, terms, operators):
    task = ArithmeticTask(digits=digits, terms=terms, operators=operators, n_train=40, n_eval=10)
    for problem in [*task.train_problems(), *task.eval_problems()]:
        expression = problem.meta["expression"]
        tokens = expression.split(" ")
        operands, ops = tokens[0::2], tokens[1::2]
        assert len(operands) == terms
        assert all(0 <= int(x) < 10**digits for x in operands)
        assert set(ops) <= set(operators)
        assert problem.answer == eval(expression)  # independent reference, trusted input
        assert isinstance(problem.answer, int)


def test_problems_are_one_short_user_message_with_stable_ids():
    task = ArithmeticTask(n_train=12, n_eval=3)
    problem = task.train_problems()[7]
    assert problem.id == "arith-train-0007"
    assert [p.id for p in task.eval_problems()] == [
        "arith-eval-0000",
        "arith-eval-0001",
        "arith-eval-0002",
    ]
    assert len(problem.messages) == 1 and problem.messages[0]["role"] == "user"
    assert problem.question == f"What is {problem.meta['expression']}? " + (
        "Reply with the final answer as a number."
    )


def test_prompt_template_is_applied():
    task = ArithmeticTask(n_train=2, n_eval=0, prompt_template="Compute {expression}.")
    problem = task.train_problems()[0]
    assert problem.question == f"Compute {problem.meta['expression']}."


def _problem(answer: int) -> Problem:
    return Problem(id="p", messages=({"role": "user", "content": "?"},), answer=answer)


@pytest.mark.parametrize(
    ("response", "answer", "reward"),
    [
        ("The answer is 8.", 8, 1.0),
        ("8", 8, 1.0),
        ("8 or 9", 8, 0.0),  # the last number counts
        ("8 or 9", 9, 1.0),
        ("-3", -3, 1.0),
        ("5 - 8 = -3", -3, 1.0),
        ("The result is \u22123", -3, 1.0),  # Unicode minus
        ("-3", 3, 0.0),
        ("1,234", 1234, 1.0),
        ("So the total is 1,234,567.", 1234567, 1.0),
        ("3, 4", 4, 1.0),  # a comma with a space separates numbers
        ("8.0", 8, 1.0),
        ("8.5", 8, 0.0),
        ("**42**", 42, 1.0),
        ("\\boxed{12}", 12, 1.0),
        ("no number here", 8, 0.0),
        ("", 0, 0.0),
        ("abc7", 7, 0.0),  # digits glued to a word are not a number
    ],
)
def test_verifier_scores_the_last_number(response, answer, reward):
    assert ArithmeticTask().verify(_problem(answer), response).reward == reward


@pytest.mark.parametrize("response", ["no number", "1,235", "-1234", "12.34"])
def test_failure_feedback_explains_without_revealing_the_answer(response):
    verdict = ArithmeticTask().verify(_problem(1234), response)
    assert verdict.reward == 0.0
    assert verdict.feedback and "not found" in verdict.feedback
    assert "1234" not in verdict.feedback and "1,234" not in verdict.feedback


def test_success_has_no_feedback():
    assert ArithmeticTask().verify(_problem(5), "5").feedback is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"digits": 0}, "digits"),
        ({"terms": 1}, "terms"),
        ({"n_train": -1}, "n_train"),
        ({"n_eval": 1.5}, "n_eval"),
        ({"seed": "x"}, "seed"),
        ({"operators": "/"}, "operators"),
        ({"operators": "++"}, "operators"),
        ({"operators": ""}, "operators"),
        ({"prompt_template": "What is it?"}, "prompt_template"),
        ({"prompt_template": "What is {expr}?"}, "prompt_template"),
        ({"n_train": 0, "n_eval": 0}, "n_train"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"ArithmeticTask\.{field}"):
        ArithmeticTask(**kwargs)


def test_arithmetic_task_implements_the_task_protocol():
    task = ArithmeticTask()
    assert isinstance(task, Task)
    assert task.name == "arithmetic"


def test_verify_batch_pairs_problems_with_responses_in_order():
    task = ArithmeticTask()
    problems = [_problem(1), _problem(2), _problem(3)]
    verdicts = verify_batch(task, problems, ["1", "x", "3"])
    assert [v.reward for v in verdicts] == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="3 problems but 2 responses"):
        verify_batch(task, problems, ["1", "2"])


class _BadRewardTask:
    name = "bad"

    def train_problems(self):
        return []

    def eval_problems(self):
        return []

    def verify(self, problem, response):
        return Verdict(reward=float(response))


@pytest.mark.parametrize("reward", ["1.5", "-0.1", "nan"])
def test_verify_batch_rejects_rewards_outside_unit_interval(reward):
    with pytest.raises(
        ValueError, match=r"task 'bad' returned reward .* must be numbers in \[0, 1\]"
    ):
        verify_batch(_BadRewardTask(), [_problem(0)], [reward])


def test_tasks_package_does_not_import_torch():
    code = "import sys, mopd.tasks; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
