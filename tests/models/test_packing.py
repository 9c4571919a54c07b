"""Packed bf16 linear weights: the plain results up to bf16 rounding, scoped to their block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from mopd.models import packing
from mopd.models.packing import packed_linears, packing_available
from mopd.rollout.base import SamplingParams
from mopd.rollout.hf import HFRolloutEngine

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not packing_available(), reason="this CPU/torch cannot pack bf16 weights"),
]


def _bf16_model(tokenizer):
    return make_tiny_model(tokenizer).to(torch.bfloat16)


def _ids(tokenizer):
    return torch.tensor([tokenizer.encode("The answer to 12 * 34 is")])


def _assert_bf16_close(packed, plain):
    """Equal up to a few bf16 roundings (oneDNN may block a packed product differently)."""
    torch.testing.assert_close(packed.float(), plain.float(), rtol=2e-2, atol=2e-2)


def test_packed_logits_are_the_plain_ones_up_to_bf16_rounding(tokenizer):
    model, ids = _bf16_model(tokenizer), _ids(tokenizer)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    with torch.no_grad():
        plain = model(ids).logits
        with packed_linears(model, min_elements=0) as n:
            packed = model(ids).logits
    assert n == linears > 0
    _assert_bf16_close(packed, plain)


def test_forwards_are_restored_after_the_block_even_on_error(tokenizer):
    model = _bf16_model(tokenizer)
    head = model.lm_head
    own = lambda x: x  # noqa: E731 - an instance-level forward set by someone else
    head.forward = own
    with pytest.raises(RuntimeError, match="inside"), packed_linears(model, min_elements=0):
        assert model.model.layers[0].mlp.down_proj.__dict__.get("forward") is not None
        raise RuntimeError("inside")
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not head)
    assert head.forward is own


def test_with_gradients_the_plain_path_runs_and_gradients_match(tokenizer):
    model, ids = _bf16_model(tokenizer), _ids(tokenizer)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    model(ids).logits.float().sum().backward()
    plain = model.model.layers[0].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    with packed_linears(model, min_elements=0):
        model(ids).logits.float().sum().backward()
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.grad, plain)  # plain path


def test_only_large_bf16_weights_are_packed(tokenizer):
    assert packing.MIN_PACKED_ELEMENTS > 64 * 128  # the tiny model's largest matrices
    with packed_linears(_bf16_model(tokenizer)) as n:
        assert n == 1  # the tied LM head: vocabulary x 64
    with packed_linears(make_tiny_model(tokenizer), min_elements=0) as n:
        assert n == 0  # float32: MKL's own path, nothing to pack


def test_generation_on_packed_weights_gives_the_same_rollouts(tokenizer, monkeypatch):
    model = _bf16_model(tokenizer)
    engine = HFRolloutEngine(model, tokenizer, batch_size=4)
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=8)
    prompt = _ids(tokenizer)[0].tolist()
    monkeypatch.setattr(packing, "MIN_PACKED_ELEMENTS", 2**62)
    plain = engine.generate([prompt], n=4, params=params, seed=3)
    monkeypatch.setattr(packing, "MIN_PACKED_ELEMENTS", 0)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or original(*a)
    )
    packed = engine.generate([prompt], n=4, params=params, seed=3)
    assert calls  # the packed path ran
    assert packed == plain
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_teacher_is_packed_only_inside_its_block(tokenizer, monkeypatch):
    from mopd.models.scoring import build_scoring_batch
    from mopd.models.teachers import EmaTeacher

    monkeypatch.setattr(packing, "MIN_PACKED_ELEMENTS", 0)
    student = _bf16_model(tokenizer)
    teacher = EmaTeacher(student, rate=0.05)
    batch = build_scoring_batch([_ids(tokenizer)[0].tolist()], [[11, 12, 13]], 0)
    plain = teacher.logits(batch, student=student)
    with packed_linears(teacher.model, None):  # as a step holds its teacher (and reference)
        assert "forward" in teacher.model.lm_head.__dict__
        assert "forward" not in student.lm_head.__dict__  # only the teacher's own model
        packed = teacher.logits(batch, student=student)
    assert "forward" not in teacher.model.lm_head.__dict__
    _assert_bf16_close(packed, plain)


def test_a_nested_block_packs_nothing_twice(tokenizer):
    model = _bf16_model(tokenizer)
    with packed_linears(model, min_elements=0) as outer:
        packed_forward = model.lm_head.forward
        with packed_linears(model, min_elements=0) as inner:
            assert model.lm_head.forward is packed_forward
        assert model.lm_head.forward is packed_forward
    assert outer > 0 and inner == 0
    assert "forward" not in model.lm_head.__dict__


# ---------------------------------------------------------------- LoRA layers, fused


def _bf16_lora_model(tokenizer, b_scale=0.05):
    from mopd.models.lora import add_lora

    model = add_lora(
        _bf16_model(tokenizer), r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init: give the adapters something to say
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    return model.eval()


def _lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def test_lora_layers_run_fused_and_give_peft_logits_up_to_bf16_rounding(tokenizer, monkeypatch):
    model, ids = _bf16_lora_model(tokenizer), _ids(tokenizer)
    calls = []
    original = torch.nn.functional.linear
    with torch.no_grad():
        plain = model(ids).logits
        with packed_linears(model, min_elements=0) as n:
            layers = _lora_layers(model)
            assert all(hasattr(m.forward, "fused_base") for m in layers)
            assert all("forward" not in m.base_layer.__dict__ for m in layers)  # not run
            for m in layers:  # the packed product and no plain copy of the weight besides
                held = [c.cell_contents for c in m.forward.__closure__]
                big = [t for t in held if isinstance(t, torch.Tensor) and t.dim() == 2]
                big = [t for t in big if t.shape[0] == m.base_layer.out_features]
                assert [t.is_mkldnn for t in big] == [True]
            monkeypatch.setattr(
                torch.nn.functional, "linear", lambda *a: calls.append(1) or original(*a)
            )
            fused = model(ids).logits
    # 6 LoRA layers fused; the tiny model's other linears (k, o, gate, up, head) packed
    assert n == len(layers) + 2 * 4 + 1 and len(layers) == 6
    assert len(calls) == len(layers)  # u = A·x; the rest went through the packed product
    _assert_bf16_close(fused, plain)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_fused_lora_layer_rounds_the_exact_sum_once(tokenizer):
    """The fused product rounds ``W·x + b + s·B·A·x`` to bf16 once; PEFT's path rounds
    ``W·x + b`` first, and a merged bf16 copy rounds the update into the weight."""
    model = _bf16_lora_model(tokenizer, b_scale=1e-3)
    layer = _lora_layers(model)[-1]  # a down_proj
    base = layer.base_layer
    x = torch.randn(256, base.in_features, generator=torch.Generator().manual_seed(2))
    x = x.to(torch.bfloat16)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    update = layer.scaling["default"] * b @ a
    weight = base.weight.double()
    exact = (x.double() @ (weight + update).T).to(torch.bfloat16)
    merged = (x.double() @ (weight + update).to(torch.bfloat16).double().T).to(torch.bfloat16)
    with torch.no_grad():
        peft = layer(x)
        with packed_linears(model, min_elements=0):
            fused = layer(x)

    def agree(y):
        return (y == exact).float().mean().item()

    assert agree(fused) > 0.99
    assert agree(fused) > agree(peft) and agree(fused) > agree(merged)


def test_fused_lora_steps_aside_for_gradients_and_dropout(tokenizer):
    model, ids = _bf16_lora_model(tokenizer), _ids(tokenizer)
    layer = _lora_layers(model)[0]
    with packed_linears(model, min_elements=0):
        fused_forward = layer.forward
        model(ids).logits.float().sum().backward()  # grad enabled: PEFT's path
    assert layer.lora_B["default"].weight.grad is not None
    layer.lora_dropout["default"] = nn.Dropout(0.5)
    model.train()
    with packed_linears(model, min_elements=0):
        assert layer.forward is not fused_forward and not hasattr(layer.forward, "fused_base")
        assert "forward" in layer.base_layer.__dict__  # packed as a plain linear instead


def test_a_nested_block_leaves_a_fused_lora_layer_and_its_base_alone(tokenizer):
    model = _bf16_lora_model(tokenizer)
    layer = _lora_layers(model)[0]
    with packed_linears(model, min_elements=0) as outer:
        fused_forward = layer.forward
        with packed_linears(model, min_elements=0) as inner:
            assert layer.forward is fused_forward
            assert "forward" not in layer.base_layer.__dict__
    assert outer > 0 and inner == 0


def test_fuse_lora_false_packs_the_base_layers_and_an_inner_block_keeps_that(tokenizer):
    model = _bf16_lora_model(tokenizer)
    layer = _lora_layers(model)[0]
    with packed_linears(model, min_elements=0, fuse_lora=False):
        assert "forward" not in layer.__dict__ and "forward" in layer.base_layer.__dict__
        with packed_linears(model, min_elements=0) as inner:  # as an engine's own block
            assert "forward" not in layer.__dict__
    assert inner == 0
