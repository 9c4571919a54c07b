"""Write a tiny randomly initialised Llama with the packaged SmolLM2 tokenizer to a folder.

    python benchmarks/tiny_model.py OUT_DIR [--layers 2 --hidden 64]

For `gpu.sh` and quick checks of the benchmark scripts: a few MiB of weights (the 49152 x
hidden embedding dominates) that `mopd` loads like any local model folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mopd.models.loading import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(
        f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {size:.1f} MiB"
    )


if __name__ == "__main__":
    main()
