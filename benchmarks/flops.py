"""FLOPs of a training step per phase, and the fraction of this machine's matmul rate achieved.

    python benchmarks/flops.py                   # MOPD-2S1F and GRPO, the step_time setting

Peak: the fp32 `torch.matmul` rate of square matrices (n=2048, median of 5) at 1 thread
and at `--threads`, measured in this process before and after the workers. Work counted
from the tokens each step really processed (no padding; padded work is extra, not useful):

    N_body = parameters without the token embedding (tied LM head excluded), H = d * V
    forward of a row with L context and R response tokens:
        2 * N_body * L  +  2 * H * R  +  2 * L^2 * d_attn * layers      (L includes R)
    generate   one forward per rollout (prompt + response; the KV cache makes it so)
    teacher    one forward per rollout with a context (teacher prompt + response)
    student    3 forwards (forward + backward) per rollout in the loss (student prompt + response)

The LM head runs on response positions only (`logits_to_keep`). Optimizer, loss and
verifier FLOPs are left out (elementwise, small).
"""

from __future__ import annotations

import argparse
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


def matmul_gflops(threads: int, device: str = "cpu", reps: int = 5) -> float:
    """Median fp32 rate of an n x n matmul (n 2048 on CPU, 8192 on CUDA), in GFLOP/s."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
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


def model_shape(model: Any) -> dict[str, int]:
    cfg = model.config
    params = {id(p): p.numel() for p in model.parameters()}
    embed = model.get_input_embeddings().weight.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "n_body": sum(params.values()) - embed,
        "head": cfg.hidden_size * model.get_output_embeddings().weight.shape[0],
        "d_attn": cfg.num_attention_heads * head_dim,
        "layers": cfg.num_hidden_layers,
    }


def forward_flops(shape: dict[str, int], context: int, response: int) -> float:
    length = context + response
    return (
        2 * shape["n_body"] * length
        + 2 * shape["head"] * response
        + 2 * length**2 * shape["d_attn"] * shape["layers"]
    )


def worker(method: str, s: Setting) -> dict[str, Any]:
    from mopd.collect.contexts import chat_prompt_ids
    from mopd.config import load_config
    from mopd.core.seeding import derive_seed
    from mopd.training.step import train_step
    from mopd.training.trainer import Trainer, training_problems

    cfg = load_config(None, our_overrides(method, s))
    trainer = Trainer(cfg, run_dir=Path(tempfile.mkdtemp(prefix="flops-")))
    shape = model_shape(trainer.student)
    steps = []
    for i in range(s.warmup + s.steps):
        problems = training_problems(
            trainer.train_problems, seed=s.seed, start=i * s.prompts, count=s.prompts
        )
        out, metrics = train_step(trainer.parts, problems, seed=derive_seed(s.seed, "step", i))
        flops = {"generate": 0.0, "teacher": 0.0, "student": 0.0}
        for gi, (problem, group) in enumerate(zip(out.problems, out.groups, strict=True)):
            prompt = len(chat_prompt_ids(trainer.parts.tokenizer, problem.messages))
            rewards = [v.reward for v in out.verdicts[gi]]
            for ri, rollout in enumerate(group):
                r = len(rollout.response_ids)
                flops["generate"] += forward_flops(shape, prompt, r)
                t_in = out.teacher_inputs[gi][ri] if out.teacher_inputs else None
                if t_in is not None and t_in.has_context:
                    flops["teacher"] += forward_flops(shape, len(t_in.prompt_ids), r)
                    flops["student"] += 3 * forward_flops(shape, prompt, r)
                elif method == "grpo" and len(set(rewards)) > 1:  # non-zero advantage
                    flops["student"] += 3 * forward_flops(shape, prompt, r)
        steps.append(
            {"flops": flops, **{k: v for k, v in metrics.items() if k.startswith("time/")}}
        )
    return {"shape": shape, "steps": steps[s.warmup :]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mopd,grpo")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--matmul-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
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
    peaks_before = {t: matmul_gflops(t, mm_device) for t in threads}
    runs = {
        v: sysbench.run_worker("flops.py", ["--worker", v, *s.argv()])
        for v in args.variants.split(",")
    }
    peaks_after = {t: matmul_gflops(t, mm_device) for t in threads}
    peak = {t: (peaks_before[t] + peaks_after[t]) / 2 for t in threads}
    rows = []
    for v, res in runs.items():
        for phase in ("generate", "teacher", "student"):
            gflop = mean([st["flops"][phase] for st in res["steps"]]) / 1e9
            secs = mean([st[f"time/{phase}"] for st in res["steps"]])
            rate = gflop / secs if secs else float("nan")
            rows.append([v, phase, gflop, secs, rate, rate / peak[s.threads]])
        total = mean([sum(st["flops"].values()) for st in res["steps"]]) / 1e9
        secs = mean([st["time/step"] for st in res["steps"]])
        rows.append([v, "whole step", total, secs, total / secs, total / secs / peak[s.threads]])
    head = f"fp32 matmul GFLOP/s on {mm_device}, by thread count (before / after the steps): "
    head += f"{peaks_before} / {peaks_after}\n\n"
    table = head + sysbench.md_table(
        ["variant", "phase", "GFLOP", "seconds", "GFLOP/s", f"fraction of {s.threads}-thread peak"],
        rows,
    )
    data = {
        "command": " ".join(["python", *sys.argv]),
        "setting": vars(s),
        "machine": sysbench.machine(),
        "matmul_gflops_before": peaks_before,
        "matmul_gflops_after": peaks_after,
        "wall_s": time.perf_counter() - t_start,
        "runs": runs,
    }
    sysbench.save("flops", data, table, args.out)


if __name__ == "__main__":
    main()
