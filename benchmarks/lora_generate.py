"""`generate` of a bf16 LoRA student on CPU: PEFT's adapter path against the fused product.

    python benchmarks/lora_generate.py                       # 1.5B, HumanEval, 2 x 8 x 128
    python benchmarks/lora_generate.py --adapter RUN/checkpoints/step-000012/adapter

Both variants run the hf engine on packed base weights (`mopd.models.packing`); they
differ in the LoRA layers only: "peft" leaves them to PEFT (base product in bf16, then
``s·B·A·x`` added over float32 copies of the layer's output), "fused" computes each as
one packed product on ``[W, s·B]``. Calls alternate (peft, fused, peft, ...) after one
untimed warm-up each, with the same prompts and seed, so a busy machine slows both alike.

Reported per variant: the median `generate` time against the weight-read bound of
`flops.py` (each decoding step reads every weight once, the prefill runs at this
machine's bf16 matmul peak; both rates measured here, before and after), and how many of the fused variant's
responses are token for token those of PEFT's (the two products round differently; a
sampled token flips where two candidates' probabilities straddle the uniform draw).
The adapter is a trained one from `--adapter`, or a fresh one whose B is drawn at
`--b-scale` (B = 0 would make the adapters a no-op).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import sysbench
import torch
from flops import forward_flops, matmul_gflops, model_shape, read_gbps

from mopd.collect.contexts import chat_prompt_ids
from mopd.models.loading import load_model, load_tokenizer
from mopd.models.lora import load_adapted
from mopd.models.packing import packed_linears
from mopd.rollout.base import SamplingParams
from mopd.rollout.hf import HFRolloutEngine
from mopd.tasks.registry import build_task


def student(args: argparse.Namespace) -> torch.nn.Module:
    if args.adapter:
        return load_adapted(args.adapter, load_model(args.model, dtype="bfloat16"))
    return sysbench.random_lora_student(args.model, args.rank, args.b_scale).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--b-scale", type=float, default=1e-3)
    parser.add_argument("--task", default="code")
    parser.add_argument("--source", default="humaneval", help="the code task's source")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="lora_generate_qwen1.5b_code")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = student(args)
    options = {"source": args.source} if args.task == "code" else {}
    problems = list(build_task(args.task, options).train_problems())[: args.prompts]
    prompts = [chat_prompt_ids(tokenizer, p.messages) for p in problems]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    engine = HFRolloutEngine(model, tokenizer, batch_size=args.prompts * args.n)
    variants = {
        "peft": lambda: packed_linears(model, fuse_lora=False),  # the engine adds nothing
        "fused": nullcontext,
    }
    rates = [(matmul_gflops(args.threads, dtype=torch.bfloat16), read_gbps(args.threads))]
    times: dict[str, list[float]] = {v: [] for v in variants}
    responses: dict[str, list[tuple[int, ...]]] = {}
    for round_ in range(args.rounds + 1):  # round 0: warm-up
        for variant, block in variants.items():
            t0 = time.perf_counter()
            with block():
                groups = engine.generate(prompts, n=args.n, params=params, seed=0)
            if round_ > 0:
                times[variant].append(time.perf_counter() - t0)
            responses[variant] = [r.response_ids for group in groups for r in group]
            print(f"round {round_} {variant}: {time.perf_counter() - t0:.1f} s", flush=True)
    rates.append((matmul_gflops(args.threads, dtype=torch.bfloat16), read_gbps(args.threads)))
    peak, bandwidth = (statistics.mean(r) for r in zip(*rates, strict=True))
    shape = model_shape(model)
    decode_steps = max(len(r) for r in responses["fused"])  # one chunk: the longest row
    prefill = sum(forward_flops(shape, len(p), 0) for p in prompts) * args.n
    bound = decode_steps * shape["weight_bytes"] / (bandwidth * 1e9) + prefill / (peak * 1e9)
    same = sum(a == b for a, b in zip(responses["peft"], responses["fused"], strict=True))
    tokens = {v: sum(len(r) for r in rs) for v, rs in responses.items()}
    data = {
        "machine": sysbench.machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": times,
        "response_tokens": tokens,
        "identical_responses": same,
        "bf16_gflops_before_after": [r[0] for r in rates],
        "read_gbps_before_after": [r[1] for r in rates],
        "bound_s": bound,
        "responses": len(responses["fused"]),
    }
    rows = [
        [v, statistics.median(times[v]), statistics.median(times[v]) / bound, tokens[v]]
        for v in variants
    ]
    headers = ["LoRA path", "generate s (median)", "x bound", "response tokens"]
    table = sysbench.md_table(headers, rows)
    table += f"\n\nbound {bound:.1f} s: {decode_steps} decoding steps reading "
    table += f"{shape['weight_bytes'] / 1e9:.2f} GB at {bandwidth:.1f} GB/s, prefill "
    table += f"{prefill / 1e12:.1f} TFLOP at {peak:.0f} GFLOP/s"
    table += f"\n\nidentical responses: {same} of {len(responses['fused'])}; {data['machine']}"
    sysbench.save(args.name, data, table)


if __name__ == "__main__":
    main()
