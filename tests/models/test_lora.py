"""LoRA students, their EMA teacher, and the memory options, on a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")

from conftest import make_tiny_model
from mopd.config import ConfigError, load_config
from mopd.models.loading import apply_memory_options
from mopd.models.lora import (
    adapter_base_name,
    adapter_state,
    add_lora,
    is_adapter_dir,
    load_adapted,
    merged_copy,
    save_adapted_student,
)
from mopd.models.teachers import EmaTeacher

pytestmark = pytest.mark.integration

R, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lora_student(tokenizer):
    return add_lora(make_tiny_model(tokenizer), r=R, alpha=ALPHA, target_modules=TARGETS)


def _train_step(student, optimizer, seed: int) -> None:
    """One optimizer step on a next-token loss over random tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (2, 12), generator=gen)
    student.train()
    loss = student(input_ids=ids, labels=ids).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    student.eval()


def _layers(student) -> list[tuple[str, torch.nn.Module]]:
    """(plain weight name, PEFT LoRA layer) for every adapted linear layer."""
    out = []
    for name, module in student.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out.append((f"{name}.weight", module))
    return out


def _effective64(module) -> torch.Tensor:
    """W + (alpha / r)·B·A in float64, written out by hand."""
    w = module.base_layer.weight.detach().double()
    a = module.lora_A["default"].weight.detach().double()  # (r, in)
    b = module.lora_B["default"].weight.detach().double()  # (out, r)
    return w + (ALPHA / R) * b @ a


def test_ema_teacher_tracks_the_ema_of_effective_lora_weights(tokenizer):
    rate = 0.3
    student = _lora_student(tokenizer)
    layers = _layers(student)
    assert len(layers) == 2 * len(TARGETS)
    teacher = EmaTeacher(student, rate=rate)
    ref = {name: _effective64(m) for name, m in layers}  # B = 0: the base weights
    factor_ema = {
        name: (
            m.lora_A["default"].weight.detach().clone(),
            m.lora_B["default"].weight.detach().clone(),
        )
        for name, m in layers
    }
    frozen = {
        k: v.detach().clone()
        for k, v in teacher.model.named_parameters()
        if not k.endswith(tuple(f"{t}.weight" for t in TARGETS))
    }
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        _train_step(student, optimizer, seed=step)
        teacher.update(student)
        for name, m in layers:
            ref[name] = ref[name] + rate * (_effective64(m) - ref[name])
            a, b = factor_ema[name]
            a.lerp_(m.lora_A["default"].weight.detach(), rate)
            b.lerp_(m.lora_B["default"].weight.detach(), rate)

    weights = dict(teacher.model.named_parameters())
    for name, m in layers:
        torch.testing.assert_close(weights[name].double(), ref[name], rtol=0, atol=1e-6)
        # The shortcut of averaging the factors is a different model; the test sees it.
        a, b = factor_ema[name]
        factorwise = m.base_layer.weight.double() + (ALPHA / R) * b.double() @ a.double()
        assert (factorwise - ref[name]).abs().max() > 1e-4, name
    for name, value in frozen.items():  # untouched by LoRA: stays the base weight
        assert torch.equal(weights[name], value), name


def test_only_adapter_factors_are_trainable(tokenizer):
    student = _lora_student(tokenizer)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(TARGETS)  # A and B per layer, 2 layers


def test_merged_copy_computes_what_the_adapted_student_computes(tokenizer):
    student = _lora_student(tokenizer)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    _train_step(student, optimizer, seed=0)
    plain = merged_copy(student)
    assert not hasattr(plain, "peft_config")
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, student(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    # Merging a copy left the student adapted and trainable.
    assert any(p.requires_grad for p in student.parameters())


def test_saved_student_loads_merged_without_peft_and_adapter_restores_exactly(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    student = _lora_student(tokenizer)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    _train_step(student, optimizer, seed=0)
    save_adapted_student(student, tmp_path / "student", tmp_path / "adapter")

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    for name, m in _layers(student):
        got = dict(plain.named_parameters())[name].double()
        torch.testing.assert_close(got, _effective64(m), rtol=0, atol=1e-6)

    again = add_lora(
        make_tiny_model(tokenizer),
        r=R,
        alpha=ALPHA,
        target_modules=TARGETS,
        adapter_dir=tmp_path / "adapter",
    )
    restored = dict(again.named_parameters())
    for name, param in student.named_parameters():
        assert torch.equal(restored[name], param), name
        assert restored[name].requires_grad == param.requires_grad, name


def test_a_saved_adapter_loads_on_its_base_as_the_student_computed_it(tokenizer, tmp_path):
    # bf16 and an update below a bf16 weight's rounding step: the merged copy loses it.
    student = add_lora(
        make_tiny_model(tokenizer).to(torch.bfloat16), r=R, alpha=ALPHA, target_modules=TARGETS
    )
    for name, param in student.named_parameters():
        if ".lora_B." in name:
            param.data.fill_(1e-4)
    save_adapted_student(student, tmp_path / "student", tmp_path / "adapter")
    assert is_adapter_dir(tmp_path / "adapter") and not is_adapter_dir(tmp_path / "student")
    loaded = load_adapted(tmp_path / "adapter", make_tiny_model(tokenizer).to(torch.bfloat16))
    assert not loaded.training
    merged = merged_copy(student)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(5))
    student.eval()
    with torch.no_grad():
        want = student(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, want)
        assert not torch.equal(merged(input_ids=ids).logits, want)


def test_adapter_state_is_what_a_saved_adapter_folder_holds(tokenizer, tmp_path):
    from safetensors.torch import load_file

    student = _lora_student(tokenizer)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    _train_step(student, optimizer, seed=1)
    config, tensors = adapter_state(student)
    student.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(saved) and len(saved) == 2 * len(_layers(student))
    for name, tensor in tensors.items():
        assert torch.equal(tensor, saved[name]) and not tensor.requires_grad, name
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (
        R,
        ALPHA,
        sorted(TARGETS),
    )


def test_an_adapter_config_without_a_base_model_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(ValueError, match="names no base model"):
        adapter_base_name(tmp_path)


def test_bf16_autocast_keeps_fp32_weights_and_returns_fp32_logits(tokenizer):
    model = make_tiny_model(tokenizer)
    reference = copy.deepcopy(model)
    apply_memory_options(model, autocast="bfloat16")
    seen: list[torch.dtype] = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: seen.append(out.dtype)
    )
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    assert seen == [torch.bfloat16]
    assert got.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(got, want)  # really ran in bf16
    torch.testing.assert_close(got, want, rtol=0, atol=0.05)
    # Outside the model's forward, autocast is off again.
    assert not torch.is_autocast_enabled("cpu")


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    plain = make_tiny_model(tokenizer)
    ckpt = apply_memory_options(copy.deepcopy(plain), gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(4))
    for model in (plain, ckpt):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, param in ckpt.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.lora.r=-1", "model.lora.r"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
        ("model.autocast=float16", "model.autocast"),
    ],
)
def test_invalid_lora_and_memory_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("demo", [override])


def test_bf16_ema_teacher_records_lora_changes_below_bf16_resolution(tokenizer):
    base = make_tiny_model(tokenizer).to(torch.bfloat16)
    student = add_lora(base, r=R, alpha=ALPHA, target_modules=TARGETS)
    teacher = EmaTeacher(student, rate=0.05)
    layers = _layers(student)
    with torch.no_grad():  # a tiny adapter: W + s·B·A rounds back to W in bf16
        for _, m in layers:
            m.lora_B["default"].weight.fill_(1e-6)
    name, module = layers[0]
    same = _effective64(module).to(torch.bfloat16) == module.base_layer.weight
    assert same.float().mean() > 0.9  # nearly every entry: the change is below bf16's step
    teacher.update(student)
    w = module.base_layer.weight.detach().double()
    delta = _effective64(module) - w
    expected = w + 0.05 * delta
    torch.testing.assert_close(teacher.exact[name].double(), expected, rtol=1e-6, atol=1e-8)
    assert (teacher.exact[name].double() - w).abs().max() > 1e-8  # the change was kept


def test_adding_adapters_prints_no_library_deprecation_warning(tokenizer):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(make_tiny_model(tokenizer), r=4, alpha=8.0, target_modules=["q_proj"])
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
