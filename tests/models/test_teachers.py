"""Teachers: EMA arithmetic, trust-region interpolation, external vocabulary checks."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_model
from mopd.models.scoring import build_scoring_batch, response_logits
from mopd.models.teachers import (
    EmaTeacher,
    ExternalTeacher,
    TrustRegionTeacher,
    build_teacher,
    check_same_vocabulary,
)

pytestmark = pytest.mark.integration

PROMPTS = [[5, 17, 301], [9]]
RESPONSES = [[11, 12, 13], [14]]


@pytest.fixture
def batch(tokenizer):
    return build_scoring_batch(PROMPTS, RESPONSES, pad_id=tokenizer.pad_token_id)


def _train_student_to(student, other) -> None:
    """Stand-in for optimizer steps: give `student` the weights of `other`."""
    student.load_state_dict(other.state_dict())


def _params64(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return response_logits(model, batch)


def test_ema_update_moves_teacher_by_rate_toward_student(tokenizer) -> None:
    student = make_tiny_model(tokenizer, seed=0)
    teacher = EmaTeacher(student, rate=0.05)
    before = _params64(teacher.model)
    _train_student_to(student, make_tiny_model(tokenizer, seed=1))
    target = _params64(student)
    teacher.update(student)
    after = _params64(teacher.model)
    for name, old in before.items():
        expected = old + 0.05 * (target[name] - old)
        torch.testing.assert_close(after[name], expected, atol=1e-7, rtol=0)
    teacher.update(student)  # closed form after k steps: θ_S + (1-rate)^k (θ_T0 - θ_S)
    for name, value in _params64(teacher.model).items():
        expected = target[name] + 0.95**2 * (before[name] - target[name])
        torch.testing.assert_close(value, expected, atol=1e-7, rtol=0)


def test_ema_rate_zero_keeps_a_frozen_copy_of_the_initial_student(tokenizer, batch) -> None:
    student = make_tiny_model(tokenizer, seed=0)
    initial = make_tiny_model(tokenizer, seed=0)
    teacher = EmaTeacher(student, rate=0.0)
    _train_student_to(student, make_tiny_model(tokenizer, seed=1))
    teacher.update(student)
    got = teacher.logits(batch, student=student)
    # Frozen weights take another matmul path: equal up to float rounding, not bitwise.
    torch.testing.assert_close(got, _logits(initial, batch), atol=1e-6, rtol=0)
    assert not torch.allclose(got, _logits(student, batch), atol=1e-3)


def test_teacher_weights_and_logits_never_require_grad(tokenizer, batch) -> None:
    student = make_tiny_model(tokenizer).train()
    for kind in ("ema", "trust-region"):
        teacher = build_teacher(kind, student, mix=0.5)
        copied = teacher.model  # both kinds own a frozen copy of the student
        assert not any(p.requires_grad for p in copied.parameters())
        assert not teacher.logits(batch, student=student).requires_grad
    assert all(p.requires_grad for p in student.parameters())  # the student stays trainable
    assert student.training


def test_ema_state_dict_round_trip_restores_the_teacher_exactly(tokenizer, batch) -> None:
    student = make_tiny_model(tokenizer, seed=0)
    teacher = EmaTeacher(student, rate=0.3)
    _train_student_to(student, make_tiny_model(tokenizer, seed=1))
    teacher.update(student)
    saved = {k: v.clone() for k, v in teacher.state_dict().items()}
    restored = EmaTeacher(make_tiny_model(tokenizer, seed=2), rate=0.3)
    restored.load_state_dict(saved)
    assert torch.equal(
        restored.logits(batch, student=student), teacher.logits(batch, student=student)
    )
    teacher.update(student)
    restored.update(student)
    for (name, a), (_, b) in zip(
        teacher.model.named_parameters(), restored.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0, 0.25])
def test_trust_region_logits_interpolate_initial_and_current_student(tokenizer, batch, mix) -> None:
    student = make_tiny_model(tokenizer, seed=0)
    initial_logits = _logits(make_tiny_model(tokenizer, seed=0), batch).double()
    teacher = TrustRegionTeacher(student, mix=mix)
    _train_student_to(student, make_tiny_model(tokenizer, seed=1))
    current_logits = _logits(student, batch).double()
    teacher.update(student)  # a no-op: the anchor stays the initial model
    expected = (1 - mix) * initial_logits + mix * current_logits
    got = teacher.logits(batch, student=student)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_trust_region_restores_the_students_train_mode(tokenizer, batch) -> None:
    student = make_tiny_model(tokenizer).train()
    TrustRegionTeacher(student, mix=0.5).logits(batch, student=student)
    assert student.training


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        ("ema", {"rate": 1.5}, "EMA rate must be in"),
        ("ema", {"rate": -0.1}, "EMA rate must be in"),
        ("trust-region", {"mix": 2.0}, "mix must be in"),
        ("external", {}, "needs external_model"),
        ("frozen-ema", {}, "choose one of ema, trust-region, external"),
    ],
)
def test_invalid_teacher_settings_are_rejected(tiny_model, kind, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_teacher(kind, tiny_model, **kwargs)


def _llama_with_vocab(vocab_size: int, name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.name_or_path = name
    return model


def test_external_teacher_with_padded_vocab_size_is_rejected(tokenizer) -> None:
    student = _llama_with_vocab(len(tokenizer), "tiny-student")
    teacher = _llama_with_vocab(len(tokenizer) + 64, "tiny-teacher")
    with pytest.raises(ValueError) as err:
        check_same_vocabulary(tokenizer, tokenizer, student, teacher)
    message = str(err.value)
    for part in ("tiny-student", "tiny-teacher", str(len(tokenizer)), str(len(tokenizer) + 64)):
        assert part in message
    with pytest.raises(ValueError, match=str(len(tokenizer) + 64)):
        build_teacher("external", student, external_model=teacher)


def test_external_teacher_with_different_tokenizer_is_rejected(tokenizer, tiny_model) -> None:
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_teacher_token>"])
    with pytest.raises(ValueError, match="only in teacher: 1"):
        check_same_vocabulary(tokenizer, other, tiny_model, make_tiny_model(tokenizer, seed=1))


def test_external_teacher_scores_with_its_own_frozen_model(tokenizer, batch) -> None:
    student = make_tiny_model(tokenizer, seed=0)
    external = make_tiny_model(tokenizer, seed=1)
    expected = _logits(make_tiny_model(tokenizer, seed=1), batch)
    teacher = build_teacher(
        "external",
        student,
        external_model=external,
        external_tokenizer=tokenizer,
        student_tokenizer=tokenizer,
    )
    assert isinstance(teacher, ExternalTeacher)
    got = teacher.logits(batch, student=student, temperature=2.0)
    torch.testing.assert_close(got, expected / 2.0, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in external.parameters())
    assert teacher.state_dict() == {}
    with pytest.raises(ValueError, match="stores no state"):
        teacher.load_state_dict({"w": torch.zeros(1)})


def _nudge(model, scale: float = 1e-4, seed: int = 3) -> None:
    """A LoRA-sized change: every weight moves by about `scale` of its size."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * scale * p.float().abs().mean()
            p.copy_((p.float() + noise).to(p.dtype))


def test_bf16_ema_keeps_an_exact_float32_average(tokenizer) -> None:
    student = make_tiny_model(tokenizer).to(torch.bfloat16)
    teacher = EmaTeacher(student, rate=0.05)
    start = _params64(student)
    _nudge(student, scale=2e-2)  # large enough to move in bf16
    after = _params64(student)
    teacher.update(student)
    moved = [n for n in start if not torch.equal(start[n], after[n])]
    assert moved and set(teacher.exact) == set(moved)
    params = dict(teacher.model.named_parameters())
    for name in moved:
        expected = start[name] + 0.05 * (after[name] - start[name])  # step 1 moves by the rate
        torch.testing.assert_close(teacher.exact[name].double(), expected, rtol=1e-6, atol=1e-9)
        assert torch.equal(params[name], teacher.exact[name].to(torch.bfloat16))


def test_bf16_ema_follows_changes_below_bf16_resolution(tokenizer) -> None:
    student = make_tiny_model(tokenizer).to(torch.bfloat16)
    teacher = EmaTeacher(student, rate=0.05)
    naive = copy.deepcopy(teacher.model)
    reference = _params64(student)
    for step in range(20):
        _nudge(student, scale=2e-2, seed=step)
        teacher.update(student)
        with torch.no_grad():
            for mine, theirs in zip(naive.parameters(), student.parameters(), strict=True):
                mine.lerp_(theirs, 0.05)  # what a bf16 EMA without the record does
        for name, value in _params64(student).items():
            reference[name] += 0.05 * (value - reference[name])
    name = "model.layers.0.mlp.up_proj.weight"
    exact_err = (teacher.exact[name].double() - reference[name]).abs().max()
    naive_err = (dict(naive.named_parameters())[name].double() - reference[name]).abs().max()
    assert exact_err < 1e-6 < naive_err


def test_bf16_ema_record_survives_a_checkpoint_round_trip(tokenizer) -> None:
    student = make_tiny_model(tokenizer).to(torch.bfloat16)
    teacher = EmaTeacher(student, rate=0.05)
    frozen = "model.layers.1.mlp.down_proj.weight"  # a weight the student never changes
    kept = dict(student.named_parameters())[frozen].detach().clone()
    for seed in (0, 1):
        _nudge(student, scale=2e-2, seed=seed)
        with torch.no_grad():
            dict(student.named_parameters())[frozen].copy_(kept)
        teacher.update(student)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    # Compact: the float32 records of the weights that moved, no bf16 copy of the model.
    assert state and all(k.startswith("ema_float32.") for k in state)
    assert f"ema_float32.{frozen}" not in state
    # A resumed run builds its teacher from the restored student, then loads the records.
    restored = EmaTeacher(student, rate=0.05)
    restored.load_state_dict(state)
    assert restored.exact.keys() == teacher.exact.keys()
    for name, value in teacher.exact.items():
        assert torch.equal(restored.exact[name], value)
    for a, b in zip(restored.model.parameters(), teacher.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_frozen_bf16_copy_keeps_its_full_state(tokenizer) -> None:
    student = make_tiny_model(tokenizer).to(torch.bfloat16)
    reference = EmaTeacher(student, rate=0.0)  # the DPO reference: the initial student
    state = reference.state_dict()
    assert set(state) == set(reference.model.state_dict())


def test_float32_ema_keeps_no_record(tokenizer) -> None:
    student = make_tiny_model(tokenizer)
    teacher = EmaTeacher(student, rate=0.05)
    _nudge(student)
    teacher.update(student)
    assert teacher.exact == {} and not any(
        k.startswith("ema_float32.") for k in teacher.state_dict()
    )
