"""FLOPs counting of benchmarks/flops.py (tiny random models, no training)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("tied", [True, False])
def test_the_body_holds_neither_embedding_tied_or_not(load_bench, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    flops = load_bench("flops")
    d, vocab, layers = 16, 100, 2
    config = LlamaConfig(
        hidden_size=d,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    shape = flops.model_shape(model)
    total = sum(p.numel() for p in model.parameters())
    assert shape["n_body"] == total - vocab * d * (1 if tied else 2)
    assert shape["head"] == d * vocab and shape["layers"] == layers
    # The head runs on response positions only; the body on every position.
    assert flops.forward_flops(shape, 10, 0) == 2 * shape["n_body"] * 10 + 2 * 100 * 16 * layers
    assert (
        flops.forward_flops(shape, 10, 5) - flops.forward_flops(shape, 15, 0) == 2 * d * vocab * 5
    )
