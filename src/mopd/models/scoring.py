"""Score given response tokens under a causal LM: batched, padded, and exact.

Teacher and student forwards both ask the same question: for every response token y_t,
what are the model's next-token logits at the position just before it? Rows differ in
prompt and response length, so :func:`build_scoring_batch` lays each row out as

    [left padding | prompt | response | right padding]

with every prompt right-aligned at column P (the longest prompt). All responses then start
at column P and occupy columns P .. P+R-1, where R is the longest response. The logits that
predict them sit at positions P-1 .. P+R-2, which are exactly the last R positions once the
final column (never needed as an input) is dropped. :func:`response_logits` therefore runs
the model on ``L-1`` columns with ``logits_to_keep=R`` and never materialises the full
``(B, L, V)`` logits.

Position ids are ``cumsum(attention_mask) - 1`` (clamped at 0): a plain forward numbers
columns 0..L-1 regardless of the mask, which shifts every left-padded row. Rotary models
are nearly blind to a uniform shift, but models with absolute position embeddings are
not. With explicit positions and the mask, each row's logits equal those of an unpadded
forward of that row alone, up to float rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class ScoringBatch:
    """Padded prompt+response rows, aligned so every response starts at one column.

    ``input_ids``, ``attention_mask`` and ``position_ids`` are ``(B, L)`` int64 with
    ``L = prompt_width + response_width``; ``response_ids`` and ``response_mask`` are
    ``(B, R)`` int64, ``response_mask`` 1 on real response tokens and ``response_ids``
    holding the pad id where the mask is 0.
    """

    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    position_ids: Tensor  # (B, L)
    response_ids: Tensor  # (B, R)
    response_mask: Tensor  # (B, R)

    @property
    def response_width(self) -> int:
        """R: number of response columns (the longest response)."""
        return int(self.response_ids.shape[1])

    @property
    def prompt_width(self) -> int:
        """P: the column where every response starts (the longest prompt)."""
        return int(self.input_ids.shape[1]) - self.response_width

    def to(self, device: torch.device | str) -> ScoringBatch:
        """A copy with every tensor on `device` (no copy for tensors already there)."""
        return ScoringBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
        )


def build_scoring_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> ScoringBatch:
    """Lay out rows as left pad + prompt + response + right pad (see module docstring).

    Every prompt needs at least one token (the first response token is predicted from
    the last prompt position). Responses may be empty; such a row has an all-zero
    ``response_mask``.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"got {len(prompt_ids)} prompts but {len(response_ids)} responses; "
            "pass one response per prompt"
        )
    if not prompt_ids:
        raise ValueError("cannot build a scoring batch of zero rows")
    for row, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt of row {row} is empty; every row needs a prompt token")
    n_rows = len(prompt_ids)
    width_p = max(len(p) for p in prompt_ids)
    width_r = max(len(r) for r in response_ids)
    input_ids = torch.full((n_rows, width_p + width_r), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    resp_ids = torch.full((n_rows, width_r), pad_id, dtype=torch.long)
    resp_mask = torch.zeros_like(resp_ids)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        start, end = width_p - len(prompt), width_p + len(response)
        input_ids[row, start:width_p] = torch.as_tensor(prompt, dtype=torch.long)
        if response:
            input_ids[row, width_p:end] = torch.as_tensor(response, dtype=torch.long)
            resp_ids[row, : len(response)] = input_ids[row, width_p:end]
        attention_mask[row, start:end] = 1
        resp_mask[row, : len(response)] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    return ScoringBatch(input_ids, attention_mask, position_ids, resp_ids, resp_mask)


def output_vocab_size(model: PreTrainedModel) -> int:
    """V: rows of the output projection (may exceed the tokenizer's length when padded)."""
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    """Whether the architecture takes ``logits_to_keep``. A PEFT wrapper's own forward
    only passes keywords through, so its base model is asked: otherwise a LoRA student
    would project every position through the LM head ((B, L, V) logits and their
    gradient: gigabytes at a 152k vocabulary)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def response_logits(
    model: PreTrainedModel, batch: ScoringBatch, *, temperature: float = 1.0
) -> Tensor:
    """Logits predicting each response token, divided by `temperature`: ``(B, R, V)``.

    Runs with or without autograd, as the caller's context decides. The batch is moved
    to the model's device. The logits keep the model's dtype.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = batch.to(model.device)
    width_r = batch.response_width
    if width_r == 0:  # logits_to_keep=0 would mean "all positions": answer directly
        n_rows, n_vocab = batch.input_ids.shape[0], output_vocab_size(model)
        return torch.zeros(n_rows, 0, n_vocab, device=model.device, dtype=model.dtype)
    # The last column is only ever a target, never an input we need predictions from.
    inputs = {
        "input_ids": batch.input_ids[:, :-1],
        "attention_mask": batch.attention_mask[:, :-1],
        "position_ids": batch.position_ids[:, :-1],
        "use_cache": False,
    }
    if _accepts_logits_to_keep(model):
        logits_BRV = model(**inputs, logits_to_keep=width_r).logits
    else:  # architectures without the argument: full logits, then slice
        logits_BRV = model(**inputs).logits[:, -width_r:]
    return logits_BRV / temperature if temperature != 1.0 else logits_BRV
