"""Two training steps of the tiny model on each data-backed task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mopd.config import load_config
from mopd.training.trainer import Trainer

pytestmark = pytest.mark.integration

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

ROWS = {
    "math": [{"question": f"{i} + 1?", "answer": str(i + 1)} for i in range(6)],
    "mcq": [{"question": f"Pick {c}", "choices": ["a", "b", "c"], "answer": c} for c in "ABCABC"],
    "code": [
        {"question": f"Print {i}", "tests": [{"input": "", "output": str(i)}]} for i in range(6)
    ],
    "tool": TOOL_ROWS,
}


def _two_steps(tmp_path: Path, model_dir: Path, name: str, *options: str) -> None:
    cfg = load_config(
        "demo",
        [
            f"model.name={model_dir}",
            f"task.name={name}",
            *[f"task.options.{o}" for o in options],
            "rollout.n=2",
            "rollout.max_new_tokens=8",
            "train.prompts_per_step=2",
            "train.micro_batch_size=4",
            "train.steps=2",
            "eval.every=0",
            "eval.k=1",
            f"logging.output_dir={tmp_path}",
            f"logging.run_name={name}",
            "logging.progress=false",
        ],
    )
    result = Trainer(cfg).train()
    assert len(result.history) == 2
    assert all(math.isfinite(row["loss/total"]) for row in result.history)
    assert Path(result.run_dir, "rollouts.jsonl").exists()


@pytest.mark.parametrize("task", sorted(ROWS))
def test_two_steps_on_each_task(tmp_path, tiny_model_dir, task):
    data = tmp_path / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[task]))
    _two_steps(tmp_path, tiny_model_dir, task, f"data={data}", "n_eval=2")


def test_two_steps_on_math_from_parquet(tmp_path, tiny_model_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS["math"]), data)
    _two_steps(tmp_path, tiny_model_dir, "math", f"data={data}", "n_eval=2")


def test_two_steps_on_humaneval(tmp_path, tiny_model_dir):
    _two_steps(tmp_path, tiny_model_dir, "code", "source=humaneval", "n_eval=2")


def test_two_steps_on_a_reasoning_gym_generator(tmp_path, tiny_model_dir):
    _two_steps(tmp_path, tiny_model_dir, "reasoning_gym", "dataset=chain_sum", "size=8", "n_eval=2")
