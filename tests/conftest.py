"""Shared fixtures: a real tokenizer (SmolLM2's, from the packaged GGUF) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer and chat template (read from the GGUF: no conversion needed)."""
    from mopd.models.loading import DEFAULT_MODEL, load_tokenizer

    # A saved copy of the same tokenizer, for machines without the packaged GGUF.
    return load_tokenizer(os.environ.get("MOPD_TEST_TOKENIZER", DEFAULT_MODEL))


def make_tiny_model(tokenizer, *, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A randomly initialised Llama-architecture model sized for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


# One thread: on small shared CPUs, several torch threads per test process are much slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random model saved as a Hugging Face folder, usable as `model.name`."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
