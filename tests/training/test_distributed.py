"""Data-parallel training: 2 CPU processes (gloo, launched by torchrun through the CLI)
take the same steps as 1 process on the same batch, replicated or sharded (FSDP)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mopd.collect.shards import local_shards
from mopd.config import ConfigError, load_config
from mopd.training.checkpoint import load_trainer_state
from mopd.training.trainer import Trainer
from tasks_for_tests import tiny_run_overrides

TESTS_DIR = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _overrides(output_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "method=mopd",
        *tiny_run_overrides(output_dir, model_dir),
        "logging.run_name=run",
        "train.save_all_rollouts=true",
        *extra,
    ]


def _torchrun(overrides: list[str], *, resume: Path | None = None) -> str:
    """`torchrun --nproc_per_node 2 -m mopd.cli train ...` on 127.0.0.1; returns stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "mopd.cli",
        "train",
        *(["--resume", str(resume)] if resume else []),
        *overrides,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"checkpoints/step-{step:06d}/student/model.safetensors"))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    """Same rows and keys; values equal up to float summation order (timings excluded)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for row_a, row_b in zip(a, b, strict=True):
        keys = {k for k in row_a if not k.startswith(("time", "perf/"))}
        assert keys == {k for k in row_b if not k.startswith(("time", "perf/"))}
        for key in keys:
            x, y = row_a[key], row_b[key]
            if x is None or y is None:  # nan is written as null
                assert x is None and y is None, key
            else:
                assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6), (key, x, y)


def _assert_same_rollouts(a: Path, b: Path) -> None:
    rows_a, rows_b = _jsonl(a), _jsonl(b)
    assert len(rows_a) == len(rows_b)
    for x, y in zip(rows_a, rows_b, strict=True):
        for key in ("step", "problem", "index", "response_ids", "reward", "successes", "failures"):
            assert x[key] == y[key], key
        assert math.isclose(x["teacher_score"] or 0.0, y["teacher_score"] or 0.0, abs_tol=1e-4)


@pytest.mark.integration
def test_two_processes_train_like_one_process_and_resume(tmp_path, tiny_model_dir):
    # P=2 prompts x G=4 rollouts: one prompt per process, vs. both prompts in one process
    # sampled as two shards (the layout two processes use).
    single = Trainer(
        load_config("demo", _overrides(tmp_path / "one", tiny_model_dir, "train.rollout_shards=2"))
    ).train()
    printed = _torchrun(
        _overrides(
            tmp_path / "two", tiny_model_dir, "train.checkpoint_every=1", "train.keep_checkpoints=2"
        )
    )
    run = tmp_path / "two" / "run"

    a, b = _weights(single.run_dir, 2), _weights(run, 2)
    assert a.keys() == b.keys()
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(initial[k], b[k]) for k in initial), "no parameter changed"
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)

    # Every rollout of both processes was written once, by rank 0, in prompt order.
    _assert_same_rollouts(single.run_dir / "rollouts_full.jsonl", run / "rollouts_full.jsonl")
    # Metrics reduced over processes equal the one-process metrics; one row per step.
    _assert_same_metrics(_jsonl(single.run_dir / "metrics.jsonl"), _jsonl(run / "metrics.jsonl"))
    assert len(_jsonl(run / "rollouts.jsonl")) == len(_jsonl(single.run_dir / "rollouts.jsonl"))
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["run"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert printed.count("run folder:") == 1
    assert printed.count("report:") == 1

    # Resume with two processes from the step-1 checkpoint of a copy of the run.
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000002")
    (copy / "checkpoints" / "latest").write_text("step-000001")
    _torchrun([], resume=copy)
    for key in a:
        torch.testing.assert_close(_weights(copy, 2)[key], a[key], rtol=0, atol=1e-5)
    train_rows = lambda path: [r for r in _jsonl(path) if "loss/total" in r]  # noqa: E731
    _assert_same_metrics(train_rows(run / "metrics.jsonl"), train_rows(copy / "metrics.jsonl"))


@pytest.mark.integration
def test_fsdp_two_processes_train_like_one_process_and_resume(tmp_path, tiny_model_dir):
    # Student, gradients, AdamW state and EMA teacher sharded over two processes (FSDP2
    # on gloo) vs. one process. GRPO mixed with distillation: each process runs its own
    # number of micro-batches in each phase, which the lockstep must reconcile.
    mixed = ("method=grpo", "loss.kind=grpo+distill", "loss.grpo_mix=0.5", "peers.n_failure=0")
    single = Trainer(
        load_config(
            "demo", _overrides(tmp_path / "one", tiny_model_dir, "train.rollout_shards=2", *mixed)
        )
    ).train()
    overrides = _overrides(
        tmp_path / "fsdp",
        tiny_model_dir,
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
        "train.parallel=fsdp",
        *mixed,
    )
    _torchrun(overrides)
    run = tmp_path / "fsdp" / "run"
    a, b = _weights(single.run_dir, 2), _weights(run, 2)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    # The checkpoint is a plain Hugging Face folder, the teacher state full tensors.
    config = json.loads((run / "checkpoints/step-000002/student/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    teacher = torch.load(run / "checkpoints/step-000002/teacher.pt", weights_only=True)
    single_teacher = torch.load(
        single.run_dir / "checkpoints/step-000002/teacher.pt", weights_only=True
    )
    for key, value in single_teacher.items():
        torch.testing.assert_close(teacher[key], value, rtol=0, atol=1e-5)
    _assert_same_rollouts(single.run_dir / "rollouts_full.jsonl", run / "rollouts_full.jsonl")
    metrics = _jsonl(run / "metrics.jsonl")
    _assert_same_metrics(_jsonl(single.run_dir / "metrics.jsonl"), metrics)
    # The processes' micro-batch counts did differ (else this run tests no lockstep).
    assert sum(r.get("perf/lockstep_mirrored", 0) for r in metrics) > 0

    # Resume from step 1 (sharded optimizer and teacher state restored from full dicts).
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000002")
    (copy / "checkpoints" / "latest").write_text("step-000001")
    _torchrun([], resume=copy)
    for key in a:
        torch.testing.assert_close(_weights(copy, 2)[key], a[key], rtol=0, atol=1e-5)


@pytest.mark.unit
def test_fsdp_with_lora_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape("train.parallel")):
        load_config("demo", ["train.parallel=fsdp", "model.lora.r=8"])


@pytest.mark.unit
def test_resuming_a_sharded_checkpoint_unsharded_is_a_config_error(tmp_path, tiny_model):
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"step": 1, "data_position": 2, "optimizer": {}, "optimizer_format": "by-name"}
    torch.save(state, tmp_path / "trainer_state.pt")
    with pytest.raises(ConfigError, match=re.escape("train.parallel=fsdp")):
        load_trainer_state(tmp_path, optimizer=optimizer, scheduler=scheduler, student=tiny_model)


@pytest.mark.unit
def test_processes_take_whole_consecutive_shards():
    # P=8 prompts, S=4 shards of 2 prompts, W=2 processes of 2 shards each.
    assert local_shards(8, 4, 2, 0) == [(0, range(0, 2)), (1, range(2, 4))]
    assert local_shards(8, 4, 2, 1) == [(2, range(4, 6)), (3, range(6, 8))]
    assert local_shards(6, 1, 1, 0) == [(0, range(0, 6))]


@pytest.mark.unit
def test_prompts_not_divisible_by_process_count_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape("train.prompts_per_step=3")):
        local_shards(3, 2, 2, 0)  # default: one shard per process
    with pytest.raises(ConfigError, match=re.escape("train.rollout_shards=3")):
        local_shards(6, 3, 2, 1)
    with pytest.raises(ConfigError, match=re.escape("train.rollout_shards")):
        load_config("demo", ["train.prompts_per_step=4", "train.rollout_shards=3"])


@pytest.mark.unit
def test_more_processes_than_cuda_devices_is_a_config_error(monkeypatch):
    from mopd.training.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=re.escape("LOCAL_RANK=1 needs CUDA device 1")):
        init_distributed("cuda", timeout_minutes=1)
