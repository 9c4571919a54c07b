"""Batched response scoring must equal scoring each row alone, without padding."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_model
from mopd.models.scoring import build_scoring_batch, response_logits

PROMPTS = [[5, 17, 301, 42, 7], [9], [1000, 2000, 3000]]
RESPONSES = [[11, 12], [13, 14, 15, 16, 17], [18]]


@pytest.mark.unit
def test_layout_right_aligns_prompts_so_responses_share_a_start_column() -> None:
    batch = build_scoring_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 4, 0, 0], [0, 3, 5, 6, 7]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert batch.response_ids.tolist() == [[4, 0, 0], [5, 6, 7]]
    assert batch.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert (batch.prompt_width, batch.response_width) == (2, 3)


@pytest.mark.unit
def test_empty_response_gets_an_all_zero_mask() -> None:
    batch = build_scoring_batch([[1, 2], [3]], [[], [4]], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 9], [9, 3, 4]]
    assert batch.response_mask.tolist() == [[0], [1]]
    assert batch.response_ids.tolist() == [[9], [4]]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("prompts", "responses", "message"),
    [
        ([[1], []], [[2], [3]], "row 1 is empty"),
        ([[1]], [[2], [3]], "1 prompts but 2 responses"),
        ([], [], "zero rows"),
    ],
)
def test_malformed_rows_are_rejected(prompts, responses, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_scoring_batch(prompts, responses, pad_id=0)


def _unpadded_reference(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Logits predicting each response token from a forward of this row alone: (r, V)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    return logits[len(prompt) - 1 : len(prompt) + len(response) - 1]


def _tiny_gpt2(tokenizer):
    """Learned absolute positions: wrong position ids change its logits (rotary ones do not)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # default init gives position embeddings too small to matter
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    return model


@pytest.mark.integration
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_padded_batch_logits_equal_unpadded_per_row_forwards(
    tokenizer, architecture, temperature
) -> None:
    model = make_tiny_model(tokenizer) if architecture == "llama" else _tiny_gpt2(tokenizer)
    batch = build_scoring_batch(PROMPTS, RESPONSES, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits_BRV = response_logits(model, batch, temperature=temperature)
    assert logits_BRV.shape == (3, 5, len(tokenizer))
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        expected = _unpadded_reference(model, prompt, response) / temperature
        torch.testing.assert_close(logits_BRV[row, : len(response)], expected, atol=1e-4, rtol=0)


@pytest.mark.integration
def test_lm_head_only_projects_the_response_positions(tokenizer) -> None:
    model = make_tiny_model(tokenizer)
    shapes: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    batch = build_scoring_batch(PROMPTS, RESPONSES, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        response_logits(model, batch)
    assert shapes == [(3, 5, len(tokenizer))]  # never (B, L, V)


@pytest.mark.integration
def test_a_lora_student_also_projects_only_the_response_positions(tokenizer) -> None:
    pytest.importorskip("peft")
    from mopd.models.lora import add_lora

    model = make_tiny_model(tokenizer)
    plain = copy.deepcopy(model)
    student = add_lora(model, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    shapes: list[tuple[int, ...]] = []
    head = student.get_output_embeddings()
    head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    batch = build_scoring_batch(PROMPTS, RESPONSES, pad_id=tokenizer.pad_token_id)
    logits_BRV = response_logits(student, batch)  # with autograd, as in training
    assert shapes == [(3, 5, len(tokenizer))]  # never (B, L, V)
    with torch.no_grad():  # fresh adapters compute what the plain model computes
        torch.testing.assert_close(logits_BRV.detach(), response_logits(plain, batch))


@pytest.mark.integration
def test_logits_carry_gradient_only_when_the_caller_enables_it(tiny_model, tokenizer) -> None:
    batch = build_scoring_batch(PROMPTS, RESPONSES, pad_id=tokenizer.pad_token_id)
    logits_BRV = response_logits(tiny_model, batch)
    logits_BRV.sum().backward()
    assert tiny_model.model.embed_tokens.weight.grad is not None
    with torch.no_grad():
        assert not response_logits(tiny_model, batch).requires_grad


@pytest.mark.integration
def test_batch_without_response_tokens_gives_zero_width_logits(tiny_model, tokenizer) -> None:
    batch = build_scoring_batch([[1, 2], [3]], [[], []], pad_id=tokenizer.pad_token_id)
    assert response_logits(tiny_model, batch).shape == (2, 0, len(tokenizer))


@pytest.mark.integration
def test_non_positive_temperature_is_rejected(tiny_model) -> None:
    batch = build_scoring_batch([[1]], [[2]], pad_id=0)
    with pytest.raises(ValueError, match="temperature"):
        response_logits(tiny_model, batch, temperature=0.0)
