"""Training on a CUDA device with a tiny random model (skipped without CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.config import load_config
from mopd.training.trainer import Trainer
from tasks_for_tests import tiny_run_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cfg(tmp_path, model_dir, *extra: str):
    overrides = [*tiny_run_overrides(tmp_path, model_dir), "model.device=cuda", *extra]
    return load_config("demo", overrides)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["mopd", "grpo", "dpo"])
def test_methods_train_on_cuda(tmp_path, tiny_model_dir, method, dtype):
    trainer = Trainer(_cfg(tmp_path, tiny_model_dir, f"method={method}", f"model.dtype={dtype}"))
    assert next(trainer.student.parameters()).is_cuda
    before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    result = trainer.train()
    assert all(math.isfinite(r["loss/total"]) for r in result.history)
    changed = any(not torch.equal(before[k], v) for k, v in trainer.student.named_parameters())
    assert changed


def test_ema_rate_and_resume_on_cuda(tmp_path, tiny_model_dir):
    rate = 0.25
    trainer = Trainer(_cfg(tmp_path, tiny_model_dir, "train.steps=1", f"teacher.ema_rate={rate}"))
    theta0 = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    trainer.train()
    teacher = dict(trainer.teacher.model.named_parameters())  # type: ignore[union-attr]
    assert next(iter(teacher.values())).is_cuda
    for name, param in trainer.student.named_parameters():
        expected = theta0[name] + rate * (param.detach() - theta0[name])
        torch.testing.assert_close(teacher[name].detach(), expected, rtol=0, atol=1e-6)
    resumed = Trainer(trainer.config, run_dir=trainer.run_dir, resume=True)
    for key, value in resumed.teacher.model.state_dict().items():  # type: ignore[union-attr]
        torch.testing.assert_close(value, trainer.teacher.model.state_dict()[key])  # type: ignore[union-attr]
