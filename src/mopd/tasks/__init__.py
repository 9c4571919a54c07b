"""Tasks: problems for the student and verifiers that score its responses (no torch here)."""

from __future__ import annotations

from mopd.tasks.arithmetic import ArithmeticTask
from mopd.tasks.base import Task, verify_batch
from mopd.tasks.registry import BUILTIN_TASKS, build_task

__all__ = ["BUILTIN_TASKS", "ArithmeticTask", "Task", "build_task", "verify_batch"]
