"""FLOPs of a training step per phase, and the fraction of this machine's matmul rate achieved.

    python benchmarks/flops.py                   # MOPD-2S1F and GRPO, the step_time setting
    python benchmarks/flops.py --model packaged:qwen2.5-coder-1.5b-instruct --dtype bfloat16 \
        --lora 16 --task humaneval --prompts 2 --n 8 --max-new-tokens 128 --temperature 0.7
    python benchmarks/flops.py --variants mopd,mopd+model.packed_weights=false ...

Peak: the `torch.matmul` rate of square matrices in the weights' dtype (n=2048, median of
5) at 1 thread and at `--matmul-threads`, measured in this process before and after the
workers; and the rate at which one thread reads memory (the bound of token-by-token
generation, which reads every weight once per decoding step). Work counted from the
tokens each step really processed (no padding; padded work is extra, not useful):

    N_body = parameters without the token embedding and the LM head, H = d * V
    forward of a row with L context and R response tokens:
        2 * N_body * L  +  2 * H * R  +  2 * L^2 * d_attn * layers      (L includes R)
    generate   one forward per rollout (prompt + response; the KV cache makes it so)
    teacher    one forward per rollout with a context (teacher prompt + response)
    student    per rollout in the loss (student prompt + response): 3 forwards (forward +
               backward), 2 with LoRA (frozen weights get no weight gradient)

Generation's bound: each chunk of `rollout.batch_size` rows decodes as many steps as its
longest response, and each step reads all weights once; plus the prompts' prefill at the
matmul peak. The LM head runs on response positions only (`logits_to_keep`). Optimizer,
loss and verifier FLOPs are left out (elementwise, small).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import sysbench
import torch
from step_time import our_overrides
from sysbench import Setting, emit, mean


def matmul_gflops(
    threads: int, device: str = "cpu", dtype: torch.dtype = torch.float32, reps: int = 5
) -> float:
    """Median rate of an n x n matmul (n 2048 on CPU, 8192 on CUDA), in GFLOP/s."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    rates = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    torch.set_num_threads(old)
    return statistics.median(rates)


def read_gbps(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """Median rate at which `threads` threads read a `gib` GiB tensor (a sum), in GB/s."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    torch.set_num_threads(old)
    return statistics.median(rates)


def model_shape(model: Any) -> dict[str, int]:
    cfg = model.config
    params = {id(p): p.numel() for p in model.parameters()}
    # Neither embedding is body: the input one is a lookup, the LM head (tied or not) runs on
    # response positions only and is counted apart.
    for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        params.pop(id(table), None)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "n_body": sum(params.values()),
        "head": cfg.hidden_size * model.get_output_embeddings().weight.shape[0],
        "d_attn": cfg.num_attention_heads * head_dim,
        "layers": cfg.num_hidden_layers,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def forward_flops(shape: dict[str, int], context: int, response: int) -> float:
    length = context + response
    return (
        2 * shape["n_body"] * length
        + 2 * shape["head"] * response
        + 2 * length**2 * shape["d_attn"] * shape["layers"]
    )


def worker(variant: str, s: Setting) -> dict[str, Any]:
    """One variant's steps; a variant is a method with optional `+key=value` overrides."""
    from mopd.collect.contexts import chat_prompt_ids
    from mopd.config import load_config
    from mopd.core.seeding import derive_seed
    from mopd.training.step import train_step
    from mopd.training.trainer import Trainer, training_problems

    method, *extra = variant.split("+")
    cfg = load_config(None, [*our_overrides(method, s), *extra])
    trainer = Trainer(cfg, run_dir=Path(tempfile.mkdtemp(prefix="flops-")))
    shape = model_shape(trainer.student)
    backward = 2 if cfg.model.lora.r > 0 else 3
    chunk = cfg.rollout.batch_size
    steps = []
    for i in range(s.warmup + s.steps):
        problems = training_problems(
            trainer.train_problems, seed=s.seed, start=i * s.prompts, count=s.prompts
        )
        out, metrics = train_step(trainer.parts, problems, seed=derive_seed(s.seed, "step", i))
        flops = {"generate": 0.0, "teacher": 0.0, "student": 0.0}
        prefill, lengths = 0.0, []
        for gi, (problem, group) in enumerate(zip(out.problems, out.groups, strict=True)):
            prompt = len(chat_prompt_ids(trainer.parts.tokenizer, problem.messages))
            rewards = [v.reward for v in out.verdicts[gi]]
            for ri, rollout in enumerate(group):
                r = len(rollout.response_ids)
                lengths.append(r)
                prefill += forward_flops(shape, prompt, 0)
                flops["generate"] += forward_flops(shape, prompt, r)
                t_in = out.teacher_inputs[gi][ri] if out.teacher_inputs else None
                if t_in is not None and t_in.has_context:
                    flops["teacher"] += forward_flops(shape, len(t_in.prompt_ids), r)
                    flops["student"] += backward * forward_flops(shape, prompt, r)
                elif method == "grpo" and len(set(rewards)) > 1:  # non-zero advantage
                    flops["student"] += backward * forward_flops(shape, prompt, r)
        decode_steps = sum(max(lengths[i : i + chunk]) for i in range(0, len(lengths), chunk))
        steps.append(
            {
                "flops": flops,
                "prefill_flops": prefill,
                "decode_steps": decode_steps,
                "response_tokens": sum(lengths),
                # equal digests: the variants drew the same rollouts (same seeds)
                "rollouts_digest": hashlib.sha256(
                    repr([[r.response_ids for r in g] for g in out.groups]).encode()
                ).hexdigest()[:16],
                "loss": metrics.get("loss/total"),
                **{k: v for k, v in metrics.items() if k.startswith("time/")},
            }
        )
    return {"shape": shape, "steps": steps[s.warmup :]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mopd,grpo")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--matmul-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="flops", help="result files' name (NAME.json, NAME.md)")
    Setting().add_arguments(parser)
    args = parser.parse_args()
    s = Setting.from_args(args)
    if args.steps is None:  # two timed steps are enough to count work
        s = replace(s, steps=2)
    if args.worker:
        torch.set_num_threads(s.threads)
        emit(worker(args.worker, s))
        return

    t_start = time.perf_counter()
    threads = sorted({s.threads, args.matmul_threads})
    mm_device = "cuda" if s.device != "cpu" and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, s.dtype)

    def measure_machine() -> tuple[dict[int, float], float]:
        peaks = {t: matmul_gflops(t, mm_device, dtype) for t in threads}
        return peaks, (read_gbps(s.threads) if mm_device == "cpu" else float("nan"))

    peaks_before, read_before = measure_machine()
    runs = {
        v: sysbench.run_worker("flops.py", ["--worker", v, *s.argv()], timeout=7200)
        for v in args.variants.split(",")
    }
    peaks_after, read_after = measure_machine()
    peak = {t: (peaks_before[t] + peaks_after[t]) / 2 for t in threads}
    bandwidth = (read_before + read_after) / 2
    rows = []
    for v, res in runs.items():
        steps = res["steps"]
        for phase in ("generate", "teacher", "student"):
            gflop = mean([st["flops"][phase] for st in steps]) / 1e9
            secs = mean([st[f"time/{phase}"] for st in steps])
            rate = gflop / secs if secs else float("nan")
            bound: float | str = ""
            if phase == "generate":  # weight reads per decoding step + prefill at peak
                bound = mean(
                    [
                        st["decode_steps"] * res["shape"]["weight_bytes"] / (bandwidth * 1e9)
                        + st["prefill_flops"] / (peak[s.threads] * 1e9)
                        for st in steps
                    ]
                )
            rows.append([v, phase, gflop, secs, rate, rate / peak[s.threads], bound])
        total = mean([sum(st["flops"].values()) for st in steps]) / 1e9
        secs = mean([st["time/step"] for st in steps])
        rows.append(
            [v, "whole step", total, secs, total / secs, total / secs / peak[s.threads], ""]
        )
    head = f"{s.dtype} matmul GFLOP/s on {mm_device}, by thread count (before / after the "
    head += f"steps): {peaks_before} / {peaks_after}; memory read GB/s with {s.threads} "
    head += f"thread(s): {read_before:.1f} / {read_after:.1f}\n\n"
    table = head + sysbench.md_table(
        [
            "variant",
            "phase",
            "GFLOP",
            "seconds",
            "GFLOP/s",
            f"fraction of {s.threads}-thread peak",
            "weight-read bound s",
        ],
        rows,
    )
    digests = {v: [st["rollouts_digest"] for st in res["steps"]] for v, res in runs.items()}
    losses = {v: [st["loss"] for st in res["steps"]] for v, res in runs.items()}
    table += f"\nrollout digests per timed step: {digests}\nloss/total per timed step: {losses}\n"
    data = {
        "command": " ".join(["python", *sys.argv]),
        "setting": vars(s),
        "machine": sysbench.machine(),
        "matmul_gflops_before": peaks_before,
        "matmul_gflops_after": peaks_after,
        "read_gbps_before": read_before,
        "read_gbps_after": read_after,
        "wall_s": time.perf_counter() - t_start,
        "runs": runs,
    }
    sysbench.save(args.name, data, table, args.out)


if __name__ == "__main__":
    main()
