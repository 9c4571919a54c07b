"""The one-adapter fast path against vLLM's own CPU LoRA ops (needs vLLM: `make test-vllm`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from mopd.rollout import vllm_cpu_lora

pytestmark = pytest.mark.unit

TOKENS, IN, OUT, RANK, SLOTS = 7, 24, 40, 8, 2


@pytest.fixture(scope="module")
def ops():
    assert vllm_cpu_lora.install()
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    return lora_ops, punica_cpu


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, IN, generator=g).to(torch.bfloat16)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=g).to(torch.bfloat16)  # vLLM's stacked layout
    h = torch.randn(TOKENS, RANK, generator=g)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g).to(torch.bfloat16)
    y = torch.randn(TOKENS, OUT + 6, generator=g).to(torch.bfloat16)
    return x, a, h, b, y


INDICES = {
    "one adapter": torch.full((TOKENS,), 1),
    "two adapters": torch.tensor([0, 1, 1, 0, 1, 0, 0]),
    "tokens without one": torch.tensor([1, 1, -1, 1, 1, 1, 1]),
}


def _counted_products(monkeypatch) -> list[int]:
    """Calls of the fast path's matrix product from here on."""
    calls: list[int] = []
    product = vllm_cpu_lora._product

    def counted(*args):
        calls.append(1)
        return product(*args)

    monkeypatch.setattr(vllm_cpu_lora, "_product", counted)
    return calls


@pytest.mark.parametrize("case", list(INDICES))
def test_fast_ops_compute_what_vllms_ops_compute(ops, case, monkeypatch):
    lora_ops, punica_cpu = ops
    calls = _counted_products(monkeypatch)
    original = vllm_cpu_lora._originals
    idx = INDICES[case]
    x, a, h, b, y = _data(0)
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        assert getattr(lora_ops, name) is getattr(punica_cpu, name) is vllm_cpu_lora.FAST[name]
    got, want = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    lora_ops.bgmv_shrink(x, a, got, idx, 0.5)
    original["bgmv_shrink"](x, a, want, idx, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    for add in (True, False):
        got, want = y.clone(), y.clone()
        lora_ops.bgmv_expand(h, b, got, idx, add)
        original["bgmv_expand"](h, b, want, idx, add)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-2)
        got, want = y.clone(), y.clone()
        lora_ops.bgmv_expand_slice(h, b, got, idx, 3, OUT, add)
        original["bgmv_expand_slice"](h, b, want, idx, 3, OUT, add)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-2)
    # the one-adapter case is the fast path's (one product per call), the others vLLM's
    assert len(calls) == (5 if case == "one adapter" else 0)


def test_sgmv_ops_reach_the_fast_path(ops, monkeypatch):
    """vLLM's prefill op (sgmv) calls the bgmv op of its module: the patched one."""
    lora_ops, _ = ops
    calls = _counted_products(monkeypatch)
    x, a, _, _, _ = _data(1)
    out = torch.zeros(TOKENS, RANK)
    starts, lengths, indices = torch.tensor([0, 3]), torch.tensor([3, 4]), torch.tensor([1, 1])
    lora_ops.sgmv_shrink(x, a, out, starts, lengths, indices, 2, 4, TOKENS, 1.0)
    assert calls == [1]
