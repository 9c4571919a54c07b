"""The fused LoRA training path: PEFT's function and gradients, without its float32 copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from mopd.models.fused_lora import LoraLinear, fused_lora_training
from mopd.models.lora import add_lora

pytestmark = pytest.mark.integration

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _student(tokenizer, dtype=torch.bfloat16, dropout=0.0):
    model = add_lora(
        make_tiny_model(tokenizer).to(dtype), r=4, alpha=8.0, target_modules=TARGETS,
        dropout=dropout,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would hide the B·A term
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.train()


def _ids(tokenizer):
    return torch.tensor([tokenizer.encode("The answer to 12 * 34 is 408, and 5 + 6 is 11")] * 2)


def _loss(model, ids):
    return model(ids).logits.float().logsumexp(-1).mean()


def _count_calls(monkeypatch) -> list[int]:
    """A list that grows by one on each `LoraLinear.apply` (which still runs)."""
    calls: list[int] = []
    original = LoraLinear.apply
    monkeypatch.setattr(LoraLinear, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def test_one_layer_matches_float64_in_value_and_gradients():
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, r, s = 64, 96, 80, 8, 2.0
    x = torch.randn(n, d_in, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(d_out, d_in, generator=g) * 0.1).to(torch.bfloat16)
    bias = (torch.randn(d_out, generator=g) * 0.1).to(torch.bfloat16)
    a = (torch.randn(r, d_in, generator=g) * 0.1).requires_grad_(True)
    b = (torch.randn(d_out, r, generator=g) * 1e-3).requires_grad_(True)
    grad_y = torch.randn(n, d_out, generator=g).to(torch.bfloat16)

    y = LoraLinear.apply(x, weight, bias, a, b, s)
    y.backward(grad_y)

    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    y64 = x64 @ weight.double().T + bias.double() + s * (x64 @ a64.T) @ b64.T
    y64.backward(grad_y.double())
    assert y.dtype == torch.bfloat16
    # Rounded twice (W·x + b, then with the update), like PEFT's path: within 2 bf16 steps
    # of the output (near 0, of the terms that cancelled there).
    torch.testing.assert_close(y.double(), y64, rtol=2 * 2**-8, atol=1e-4)
    # The adapters' gradients are float32 products of exact inputs.
    for grad, exact in ((a.grad, a64.grad), (b.grad, b64.grad)):
        assert (grad.double() - exact).norm() < 1e-6 * exact.norm()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2 * 2**-8, atol=1e-4)


def test_a_student_gets_peft_loss_and_gradients_through_the_fused_layers(tokenizer, monkeypatch):
    model, ids = _student(tokenizer), _ids(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _loss(model, ids).backward()
    peft_grads = [p.grad.clone() for p in trainable]
    model.zero_grad()
    with fused_lora_training(model) as n:
        calls = _count_calls(monkeypatch)
        loss = _loss(model, ids)
        loss.backward()
    assert n == len(calls) == 2 * len(TARGETS)  # every adapted layer of both decoder layers
    for p, peft in zip(trainable, peft_grads, strict=True):
        cos = nn.functional.cosine_similarity(p.grad.flatten(), peft.flatten(), dim=0)
        assert cos > 0.999
        torch.testing.assert_close(p.grad.norm(), peft.norm(), rtol=0.02, atol=1e-8)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_other_layer_states_keep_peft_path(tokenizer, monkeypatch):
    ids = _ids(tokenizer)
    with fused_lora_training(_student(tokenizer, dtype=torch.float32)) as n:
        assert n == 0  # float32 weights: PEFT's float32 path has no copies to save
    with fused_lora_training(_student(tokenizer, dropout=0.1)) as n:
        assert n == 0  # dropout acts on the adapters' input in training
    model = _student(tokenizer)
    with fused_lora_training(model, enabled=False) as n:
        assert n == 0
    with fused_lora_training(model) as n, model.disable_adapter():
        assert n > 0
        calls = _count_calls(monkeypatch)
        _loss(model, ids)
        assert not calls  # switched off on the fly: checked on every call


def test_a_bias_on_b_or_autocast_keeps_peft_path(tokenizer, monkeypatch):
    from mopd.models.packing import packed_linears

    model, ids = _student(tokenizer), _ids(tokenizer)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("lora_B.default") and "q_proj" in name:
                module.bias = nn.Parameter(torch.full((module.out_features,), 0.5))
    biased = [m for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    biased = [m for m in biased if m.lora_B["default"].bias is not None]
    assert biased
    with fused_lora_training(model), packed_linears(model, min_elements=0):
        assert not any("forward" in m.__dict__ for m in biased)  # PEFT adds s·bias: left to it
    # Under autocast the float32 parts would run in bf16: PEFT's path, and no crash.
    reference = _loss(model, ids)
    with fused_lora_training(model), torch.autocast("cpu", dtype=torch.bfloat16):
        calls = _count_calls(monkeypatch)
        loss = _loss(model, ids)
        loss.backward()
    assert not calls and torch.isfinite(loss) and torch.isfinite(reference)
