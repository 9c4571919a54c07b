"""Turn a task name from the config into a `Task` object.

Two kinds of names:

- a built-in name, e.g. "arithmetic";
- "package.module:factory" for a user's own task: the module is imported (it must be on
  `sys.path`), `factory(**options)` is called (a class or a function), and the result
  is checked for the `Task` members, so a mistake shows up when the run starts rather
  than in the middle of the first step.

Options are checked against the factory's signature before the call, so a misspelt
option is reported by name instead of as a bare TypeError from deep inside a constructor.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from mopd.tasks.arithmetic import ArithmeticTask
from mopd.tasks.base import Task
from mopd.tasks.code import CodeTask
from mopd.tasks.gym import ReasoningGymTask
from mopd.tasks.math import MathTask
from mopd.tasks.mcq import MultipleChoiceTask
from mopd.tasks.tool import ToolTask

__all__ = ["BUILTIN_TASKS", "build_task"]

BUILTIN_TASKS: Mapping[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "code": CodeTask,
    "math": MathTask,
    "mcq": MultipleChoiceTask,
    "reasoning_gym": ReasoningGymTask,
    "tool": ToolTask,
}

_REQUIRED_METHODS = ("train_problems", "eval_problems", "verify")


class TaskError(ValueError):
    """A task name, option or data file the user must fix (the message says which)."""


def build_task(name: str, options: Mapping[str, Any]) -> Task:
    """Build the task `name` with keyword `options`.

    Raises:
        TaskError: unknown name, unloadable plugin, options the factory does not accept,
            invalid option values or data, or a plugin result that is not a Task.
    """
    if ":" in name:
        factory = _load_plugin(name)
    elif name in BUILTIN_TASKS:
        factory = BUILTIN_TASKS[name]
    else:
        raise TaskError(
            f"unknown task {name!r}; built-in tasks: {', '.join(sorted(BUILTIN_TASKS))}; "
            "for your own task give 'package.module:factory'"
        )
    _check_options(name, factory, options)
    try:
        task = factory(**options)
    except ValueError as exc:  # validation and data errors name the field; add the task
        raise TaskError(f"task {name!r}: {exc}") from exc
    except TypeError as exc:  # signature unavailable or a type the factory rejects
        raise TaskError(f"task {name!r} rejected its options {dict(options)!r}: {exc}") from exc
    _check_is_task(name, task)
    return task


def _load_plugin(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TaskError(f"task {spec!r} must have the form 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(
            f"task {spec!r}: cannot import module {module_name!r} ({exc}); "
            "is it installed or on PYTHONPATH?"
        ) from exc
    factory: Any = module
    for part in attr.split("."):  # allows "module:Class.factory_method"
        if not hasattr(factory, part):
            raise TaskError(f"task {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TaskError(f"task {spec!r}: {attr!r} is a {type(factory).__name__}, not callable")
    return factory  # type: ignore[no-any-return]


def _check_options(name: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Name unknown or missing options before calling `factory`."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        return
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p for p in signature.parameters.values() if p.kind in keyword_kinds]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [key for key in options if key not in {p.name for p in params}]
    if unknown and not takes_any:
        raise TaskError(
            f"task {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(p.name for p in params) or '(none)'}"
        )
    missing = [p.name for p in params if p.default is p.empty and p.name not in options]
    if missing:
        raise TaskError(f"task {name!r} needs option {', '.join(map(repr, missing))}")


def _check_is_task(name: str, task: Any) -> None:
    missing = [m for m in _REQUIRED_METHODS if not callable(getattr(task, m, None))]
    if not isinstance(getattr(task, "name", None), str):
        missing.insert(0, "name (a str)")
    if missing:
        raise TaskError(
            f"task {name!r} built a {type(task).__name__} that is not a Task: missing "
            f"{', '.join(missing)} (see mopd.tasks.Task)"
        )
