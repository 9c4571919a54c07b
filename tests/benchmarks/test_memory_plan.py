"""benchmarks/memory_plan.py: the per-GPU memory arithmetic."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_memory_plan_counts_qwen3_8b_parameters(load_bench):
    memory = load_bench("memory_plan")
    assert memory.MODELS["qwen3-8b"].params() == pytest.approx(8.19e9, rel=0.01)
    assert memory.MODELS["qwen3-4b"].params() == pytest.approx(4.02e9, rel=0.01)
    rows = memory.plan(memory.MODELS["qwen3-8b"], gpus=8)
    assert rows["replicated (no FSDP): states / GPU"] > 80 > rows["total / GPU"]
