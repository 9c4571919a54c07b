"""Where a bf16 LoRA student's `generate` time goes on CPU: the prefill and a decoding step.

    python benchmarks/lora_prefill.py                 # 1.5B: 16 rows x 250 tokens, 24 steps

One prefill of `--rows` rows of `--tokens` random token ids, then `--steps` decoding
steps on the KV cache (the greedy token, one row each), on packed base weights
(`mopd.models.packing`) in three variants that alternate after one warm-up each:

- no adapters: the adapters switched off, base layers packed;
- peft: PEFT's LoRA layers (`W·x` in bf16, the update over float32 copies of the output);
- fused: each LoRA layer as one packed product (what the engine runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import AbstractContextManager, ExitStack

import sysbench
import torch

from mopd.models.packing import packed_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="lora_prefill_qwen1.5b")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = sysbench.random_lora_student(args.model, args.rank, b_scale=1e-3).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20_000, (args.rows, args.tokens), generator=generator)

    def blocks(variant: str) -> list[AbstractContextManager[object]]:
        if variant == "no adapters":  # off first: the packing then sees plain layers
            return [model.disable_adapter(), packed_linears(model)]
        return [packed_linears(model, fuse_lora=variant == "fused")]

    def run(variant: str) -> tuple[float, float]:
        with torch.no_grad(), ExitStack() as stack:
            for block in blocks(variant):
                stack.enter_context(block)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            return prefill, (time.perf_counter() - t0) / args.steps

    variants: list[str] = ["no adapters", "peft", "fused"]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for round_ in range(args.rounds + 1):  # round 0: warm-up
        for variant in variants:
            prefill, step = run(variant)
            if round_ > 0:
                times[variant].append((prefill, step))
            print(f"round {round_} {variant}: prefill {prefill:.2f} s, step {step * 1e3:.0f} ms")
    rows = [
        [
            v,
            statistics.median(p for p, _ in times[v]),
            statistics.median(s for _, s in times[v]) * 1e3,
        ]
        for v in variants
    ]
    table = sysbench.md_table(["LoRA path", "prefill s (median)", "decoding step ms"], rows)
    table += f"\n\n{args.rows} rows x {args.tokens} tokens, {args.steps} steps; "
    table += str(sysbench.machine())
    data = {"machine": sysbench.machine(), "args": vars(args), "seconds": times}
    sysbench.save(args.name, data, table)


if __name__ == "__main__":
    main()
