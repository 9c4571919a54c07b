"""Memory arithmetic for the paper's recipe on GPUs: what each GPU holds, in GB.

Pure arithmetic from the model's published shape (no download, nothing measured):

    python benchmarks/memory_plan.py                    # Qwen3-8B, 8 GPUs
    python benchmarks/memory_plan.py --model qwen3-4b --gpus 16

Assumptions (the settings docs/scaling.md recommends): fp32 master weights with bf16
autocast, fp32 gradients and AdamW moments, an fp32 EMA teacher, all four sharded over
the GPUs (FSDP); each GPU also runs a colocated vLLM engine holding a bf16 copy of the
student and the KV cache of its share of the rollouts; training micro-batches of one
rollout with gradient checkpointing, logits kept for response positions only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Shape:
    """Decoder shape as in the model's config.json."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # tie_word_embeddings

    def params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden + 2 * self.head_dim  # two RMSNorms + q/k norms
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attn + mlp + norms) + embeddings + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


MODELS = {  # Qwen/Qwen3-8B and Qwen/Qwen3-4B config.json
    "qwen3-8b": Shape(4096, 36, 12288, 32, 8, 128, 151936, tied=False),
    "qwen3-4b": Shape(2560, 36, 9728, 32, 8, 128, 151936, tied=True),
}


def plan(
    shape: Shape,
    gpus: int,
    prompts: int = 32,
    rollouts: int = 8,
    prompt_tokens: int = 512,
    response_tokens: int = 4096,
    teacher_prompt_tokens: int = 10240,
) -> dict[str, float]:
    n = shape.params()
    seqs_per_gpu = prompts * rollouts / gpus
    # KV cache: each prompt's G rollouts share its prefix (prefix caching).
    kv_tokens = prompts / gpus * prompt_tokens + seqs_per_gpu * response_tokens
    # Activations of one training micro-batch (one rollout): checkpointed layer inputs
    # in bf16 for the teacher's longer sequence bound the student's too, plus the logits
    # of the response positions, fp32, for student (with its gradient) and teacher.
    seq = teacher_prompt_tokens + response_tokens
    checkpoints = shape.layers * seq * shape.hidden * 2
    logits = 3 * response_tokens * shape.vocab * 4
    layer = n / shape.layers * 4  # one fp32 layer gathered by FSDP, and the next prefetched
    rows = {
        "parameters (billions)": n / 1e9,
        "student fp32 weights / GPU": 4 * n / gpus / GB,
        "gradients fp32 / GPU": 4 * n / gpus / GB,
        "AdamW moments fp32 / GPU": 8 * n / gpus / GB,
        "EMA teacher fp32 / GPU": 4 * n / gpus / GB,
        "FSDP gathered layers (2, fp32)": 2 * layer / GB,
        "vLLM weights bf16 (full copy)": 2 * n / GB,
        "vLLM KV cache bf16": kv_tokens * shape.kv_bytes_per_token() / GB,
        "training activations + logits (micro-batch 1)": (checkpoints + logits) / GB,
    }
    rows["total / GPU"] = sum(v for k, v in rows.items() if k != "parameters (billions)")
    rows["replicated (no FSDP): states / GPU"] = 20 * n / GB
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="per-GPU memory of the paper's recipe")
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3-8b")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=4096)
    args = parser.parse_args()
    rows = plan(MODELS[args.model], args.gpus, response_tokens=args.response_tokens)
    print(f"| {args.model}, {args.gpus} GPUs | GB |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
