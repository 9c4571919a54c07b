"""One real training step of the packaged SmolLM2-135M-Instruct (converted once, cached)."""

from __future__ import annotations

import math

import pytest

from mopd.config import load_config
from mopd.training.trainer import Trainer

pytestmark = pytest.mark.slow


def test_packaged_model_runs_one_mopd_step(tmp_path):
    cfg = load_config(
        "demo",
        [
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.n=4",
            "rollout.max_new_tokens=16",
            "eval.k=1",
            "eval.max_prompts=2",
            "eval.max_new_tokens=8",
            f"logging.output_dir={tmp_path}",
            "logging.progress=false",
        ],
    )
    result = Trainer(cfg).train()
    row = result.history[0]
    assert math.isfinite(row["loss/total"])
    assert 0.0 <= row["rollout/success_rate"] <= 1.0
    assert (result.run_dir / "checkpoints" / "latest").exists()
