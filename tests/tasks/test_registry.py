"""build_task: built-ins, user plugins loaded by "module:factory", and the errors users see."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator

import pytest

from mopd.tasks import ArithmeticTask, Task, build_task

pytestmark = pytest.mark.unit

PLUGIN_MODULE = "mopd_test_plugin_tasks"

PLUGIN_SOURCE = textwrap.dedent(
    '''
    from mopd.types import Problem, Verdict


    class EchoTask:
        """Answer is the problem's own index; reply must repeat it."""

        name = "echo"

        def __init__(self, size, *, prefix="echo"):
            if size < 1:
                raise ValueError(f"EchoTask.size must be >= 1, got {size}")
            self._problems = [
                Problem(id=f"{prefix}-{i}", messages=({"role": "user", "content": str(i)},), answer=str(i))
                for i in range(size)
            ]

        def train_problems(self):
            return self._problems

        def eval_problems(self):
            return self._problems[:1]

        def verify(self, problem, response):
            return Verdict(reward=float(response.strip() == problem.answer))


    def make_echo(size, prefix="echo"):
        return EchoTask(size, prefix=prefix)


    def make_anything(**options):
        return EchoTask(options.get("size", 1))


    def make_half_task():
        class Half:
            def train_problems(self):
                return []
        return Half()


    def make_broken(size):
        return EchoTask(size, colour="red")  # a bug inside the plugin


    NOT_CALLABLE = 3
    '''
)


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Iterator[str]:
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield PLUGIN_MODULE
    sys.modules.pop(PLUGIN_MODULE, None)


def test_builtin_arithmetic_gets_its_options():
    task = build_task("arithmetic", {"digits": 2, "operators": "+-", "n_train": 5, "n_eval": 2})
    assert isinstance(task, ArithmeticTask)
    assert (task.digits, task.operators, len(task.train_problems())) == (2, "+-", 5)


def test_unknown_name_lists_the_builtin_tasks():
    with pytest.raises(ValueError, match=r"unknown task 'arithmatic'; built-in tasks: arithmetic"):
        build_task("arithmatic", {})


def test_misspelt_option_is_named_with_the_task():
    with pytest.raises(ValueError, match=r"task 'arithmetic' has no option 'digit';.*digits"):
        build_task("arithmetic", {"digit": 2})


def test_invalid_option_value_is_reported_with_task_and_field():
    with pytest.raises(ValueError, match=r"task 'arithmetic': ArithmeticTask\.terms must be"):
        build_task("arithmetic", {"terms": 1})


def test_plugin_factory_is_loaded_called_and_usable(plugin):
    task = build_task(f"{plugin}:make_echo", {"size": 3, "prefix": "e"})
    assert isinstance(task, Task)
    assert task.name == "echo"
    assert [p.id for p in task.train_problems()] == ["e-0", "e-1", "e-2"]
    assert task.verify(task.train_problems()[2], " 2\n").reward == 1.0
    assert task.verify(task.train_problems()[2], "3").reward == 0.0


def test_plugin_class_can_be_named_directly(plugin):
    task = build_task(f"{plugin}:EchoTask", {"size": 2})
    assert len(task.train_problems()) == 2


def test_plugin_with_var_keywords_accepts_any_option(plugin):
    task = build_task(f"{plugin}:make_anything", {"size": 4, "whatever": True})
    assert len(task.train_problems()) == 4


def test_plugin_missing_required_option_is_named(plugin):
    with pytest.raises(ValueError, match=r"task '.*:make_echo' needs option 'size'"):
        build_task(f"{plugin}:make_echo", {})


def test_plugin_unknown_option_lists_accepted_ones(plugin):
    with pytest.raises(ValueError, match=r"has no option 'sise'; its options are: size, prefix"):
        build_task(f"{plugin}:make_echo", {"sise": 2})


def test_plugin_validation_error_is_prefixed_with_task(plugin):
    with pytest.raises(ValueError, match=r"task '.*:make_echo': EchoTask\.size must be >= 1"):
        build_task(f"{plugin}:make_echo", {"size": 0})


def test_type_error_inside_plugin_is_rephrased_with_task_name(plugin):
    with pytest.raises(
        ValueError, match=r"task '.*:make_broken' rejected its options \{'size': 1\}"
    ):
        build_task(f"{plugin}:make_broken", {"size": 1})


def test_plugin_result_without_task_members_names_what_is_missing(plugin):
    with pytest.raises(
        ValueError,
        match=r"built a Half that is not a Task: missing name \(a str\), eval_problems, verify",
    ):
        build_task(f"{plugin}:make_half_task", {})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("mopd_no_such_module_xyz:make", r"cannot import module 'mopd_no_such_module_xyz'"),
        (f"{PLUGIN_MODULE}:make_nothing", r"has no attribute 'make_nothing'"),
        (f"{PLUGIN_MODULE}:NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not callable"),
        (f"{PLUGIN_MODULE}:", r"must have the form 'package\.module:factory'"),
        (":make_echo", r"must have the form 'package\.module:factory'"),
    ],
)
def test_unloadable_plugins_get_clear_errors(plugin, name, message):
    with pytest.raises(ValueError, match=message):
        build_task(name, {})
