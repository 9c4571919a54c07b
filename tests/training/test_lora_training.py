"""Training a LoRA student end to end: what is trained, what is saved, and exact resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from mopd.config import load_config, load_saved_config
from mopd.training.trainer import Trainer
from tasks_for_tests import tiny_run_overrides

pytestmark = pytest.mark.integration

LORA = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.target_modules=[q_proj,v_proj]"]


def _config(tmp_path: Path, model_dir: Path, *extra: str):
    overrides = [*tiny_run_overrides(tmp_path, model_dir), "logging.run_name=lora", *LORA]
    return load_config("demo", ["method=mopd", *overrides, "eval.k=1", *extra])


def test_lora_run_trains_only_adapters_and_saves_a_plain_merged_student(tmp_path, tiny_model_dir):
    extra = ("teacher.ema_rate=0.5", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    trainer = Trainer(_config(tmp_path, tiny_model_dir, *extra))
    before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    optimized = {id(p) for g in trainer.parts.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in trainer.student.parameters() if p.requires_grad}
    result = trainer.train()
    assert all(math.isfinite(row["loss/total"]) for row in result.history)
    changed = {k for k, v in trainer.student.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)

    # A periodic checkpoint keeps what resuming needs: adapter (with the tokenizer), no
    # merged copy; the last one also the merged model users load.
    periodic = result.run_dir / "checkpoints" / "step-000001"
    assert not (periodic / "student").exists()
    assert (periodic / "adapter" / "adapter_model.safetensors").exists()
    assert (periodic / "adapter" / "tokenizer_config.json").exists()
    ckpt = result.run_dir / "checkpoints" / "step-000002"
    merged = load_file(str(ckpt / "student" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in merged)
    assert (ckpt / "adapter" / "adapter_config.json").exists()
    # The teacher is a plain model that moved toward the trained student.
    teacher = trainer.teacher.model.state_dict()  # type: ignore[union-attr]
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(teacher[q], base[q])
    assert not torch.equal(teacher[q], merged[q])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: compact teacher state
def test_lora_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, dtype):
    full = Trainer(_config(tmp_path / "a", tiny_model_dir, "train.steps=3", f"model.dtype={dtype}"))
    full_result = full.train()

    # Killed after step 3 was logged but before it was saved: resume from step 1's
    # periodic checkpoint, which holds the adapter but no merged student.
    extra = ("train.checkpoint_every=1", "train.keep_checkpoints=3", f"model.dtype={dtype}")
    half = Trainer(_config(tmp_path / "b", tiny_model_dir, "train.steps=3", *extra))
    half.train()
    checkpoints = half.run_dir / "checkpoints"
    for step in (2, 3):
        shutil.rmtree(checkpoints / f"step-00000{step}")
    (checkpoints / "latest").write_text("step-000001")
    assert not (checkpoints / "step-000001" / "student").exists()
    if dtype == "bfloat16":  # the EMA teacher's float32 records alone
        state = torch.load(checkpoints / "step-000001/teacher.pt")
        assert state and all(k.startswith("ema_float32.") for k in state)
    resumed_cfg = load_saved_config(half.run_dir / "config.yaml", ["train.steps=3"])
    resumed_result = Trainer(resumed_cfg, run_dir=half.run_dir, resume=True).train()

    for rel in ("student/model.safetensors", "adapter/adapter_model.safetensors", "teacher.pt"):
        path_a = full_result.run_dir / "checkpoints/step-000003" / rel
        path_b = resumed_result.run_dir / "checkpoints/step-000003" / rel
        load = torch.load if rel.endswith(".pt") else lambda p: load_file(str(p))
        a, b = load(path_a), load(path_b)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (rel, key)

    def train_rows(path: Path) -> list[dict[str, object]]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        keep = lambda k: not k.startswith(("eval/", "time/", "perf/")) and k != "time"  # noqa: E731
        return [{k: v for k, v in r.items() if keep(k)} for r in rows if "loss/total" in r]

    assert train_rows(full_result.run_dir / "metrics.jsonl") == train_rows(
        half.run_dir / "metrics.jsonl"
    )


def test_checkpointing_and_bf16_autocast_train_with_fp32_master_weights(tmp_path, tiny_model_dir):
    cfg = _config(
        tmp_path,
        tiny_model_dir,
        "train.steps=1",
        "model.gradient_checkpointing=true",
        "model.autocast=bfloat16",
    )
    trainer = Trainer(cfg)
    result = trainer.train()
    assert math.isfinite(result.history[0]["loss/total"])
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.student.modules())


@pytest.mark.parametrize("packed", [True, False])
def test_a_bf16_lora_step_trains_through_the_fused_layers_unless_told_not_to(
    tmp_path, tiny_model_dir, monkeypatch, packed
):
    from mopd.models.fused_lora import LoraLinear

    calls = []
    original = LoraLinear.apply
    monkeypatch.setattr(LoraLinear, "apply", lambda *a: calls.append(1) or original(*a))
    extra = ("train.steps=1", "model.dtype=bfloat16", f"model.packed_weights={packed}")
    result = Trainer(_config(tmp_path, tiny_model_dir, *extra)).train()
    assert math.isfinite(result.history[-1]["loss/total"])
    assert bool(calls) == packed
