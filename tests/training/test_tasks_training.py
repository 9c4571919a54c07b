"""Two training steps of the tiny model on each data-backed task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mopd.config import load_config
from mopd.training.trainer import Trainer

pytestmark = pytest.mark.integration

ROWS = {
    "math": [{"question": f"{i} + 1?", "answer": str(i + 1)} for i in range(6)],
    "mcq": [{"question": f"Pick {c}", "choices": ["a", "b", "c"], "answer": c} for c in "ABCABC"],
    "code": [
        {"question": f"Print {i}", "tests": [{"input": "", "output": str(i)}]} for i in range(6)
    ],
}


@pytest.mark.parametrize("task", sorted(ROWS))
def test_two_steps_on_each_task(tmp_path, tiny_model_dir, task):
    data = tmp_path / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[task]))
    cfg = load_config(
        "demo",
        [
            f"model.name={tiny_model_dir}",
            f"task.name={task}",
            f"task.options.data={data}",
            "task.options.n_eval=2",
            "rollout.n=2",
            "rollout.max_new_tokens=8",
            "train.prompts_per_step=2",
            "train.micro_batch_size=4",
            "train.steps=2",
            "eval.every=0",
            "eval.k=1",
            f"logging.output_dir={tmp_path}",
            f"logging.run_name={task}",
            "logging.progress=false",
        ],
    )
    result = Trainer(cfg).train()
    assert len(result.history) == 2
    assert all(math.isfinite(row["loss/total"]) for row in result.history)
    assert Path(result.run_dir, "rollouts.jsonl").exists()


TOOL_ROWS = [
    {
        "question": f"Add {i} and 1.",
        "functions": [
            {
                "name": "add",
                "parameters": {
                    "type": "dict",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            }
        ],
        "ground_truth": {"add": {"a": [i], "b": [1]}},
    }
    for i in range(6)
]


def test_two_steps_on_the_tool_task(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(ROWS, "tool", TOOL_ROWS)  # same run as the other tasks
    test_two_steps_on_each_task(tmp_path, tiny_model_dir, "tool")
