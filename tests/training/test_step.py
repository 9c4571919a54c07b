"""The update phase of a step: what happens to weights and teacher on a bad gradient."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.training.distributed import Distributed
from mopd.training.step import update

pytestmark = pytest.mark.unit


class _CountingTeacher:
    def __init__(self) -> None:
        self.updates = 0

    def update(self, student: torch.nn.Module) -> None:
        self.updates += 1


def _setup():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return student, optimizer, scheduler, _CountingTeacher()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_gradient_skips_the_optimizer_step_and_the_teacher_update(bad):
    student, optimizer, scheduler, teacher = _setup()
    before = [p.detach().clone() for p in student.parameters()]
    student(torch.ones(1, 3)).sum().backward()
    student.weight.grad[0, 0] = bad  # type: ignore[index]
    norm, lr = update(student, optimizer, scheduler, teacher, Distributed(), grad_clip=1.0)  # type: ignore[arg-type]
    assert not math.isfinite(norm) and lr == 0.1
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert teacher.updates == 0 and student.weight.grad is None


def test_a_finite_gradient_steps_and_the_teacher_follows():
    student, optimizer, scheduler, teacher = _setup()
    before = student.weight.detach().clone()
    student(torch.ones(1, 3)).sum().backward()
    norm, _ = update(student, optimizer, scheduler, teacher, Distributed(), grad_clip=100.0)  # type: ignore[arg-type]
    assert math.isfinite(norm) and not torch.equal(before, student.weight)
    assert teacher.updates == 1
