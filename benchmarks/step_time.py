"""Step time, its breakdown, tokens/s and peak memory: GRPO vs MOPD-2S1F vs TRL's SDPO.

    python benchmarks/step_time.py                       # all three, 2 rounds
    python benchmarks/step_time.py --variants grpo,mopd --rounds 3
    python benchmarks/step_time.py --variants mopd-base,mopd --baseline-rev HEAD~1

`mopd-base` is MOPD with the step/loss/scoring files of `--baseline-rev` (before/after).

Each run is a fresh worker process (`worker` subcommand here, `trl_sdpo.py` for TRL) that
loads the model, takes `--warmup` untimed steps and then `--steps` timed ones on the same
prompts (`sysbench.Setting`). Rounds alternate the variants (grpo, mopd, trl-sdpo, grpo,
...), and ratios are of per-variant means over all timed steps of all rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sysbench
from sysbench import Setting, emit, mean, peak_rss_mb, run_worker

PHASES = ("generate", "verify", "context", "teacher", "student", "optimizer", "weight_push")
OURS = {
    "grpo": "grpo",
    "mopd": "mopd",
    "sdpo": "sdpo",
    "mopd-base": "mopd",
}  # variant -> our method preset


def task_overrides(s: Setting) -> list[str]:
    if s.task == "humaneval":
        return ["task.name=code", "task.options={source: humaneval, n_eval: 40}"]
    if s.task != "arithmetic":
        raise SystemExit(f"--task must be arithmetic or humaneval, got {s.task!r}")
    return [
        "task.name=arithmetic",
        f"task.options={{digits: {s.digits}, terms: {s.terms}, n_train: 60, n_eval: 8}}",
    ]


def our_overrides(method: str, s: Setting) -> list[str]:
    return [
        f"method={method}",
        f"model.name={s.model}",
        f"model.device={s.device}",
        f"model.dtype={s.dtype}",
        f"model.lora.r={s.lora}",
        f"model.gradient_checkpointing={bool(s.grad_ckpt)}",
        *task_overrides(s),
        f"rollout.n={s.n}",
        f"rollout.temperature={s.temperature}",
        f"rollout.max_new_tokens={s.max_new_tokens}",
        f"train.prompts_per_step={s.prompts}",
        f"train.micro_batch_size={s.micro_batch or s.prompts * s.n}",
        f"train.threads={s.threads}",
        f"train.seed={s.seed}",
        f"loss.topk={s.topk}",
        f"loss.alpha={s.alpha}",
        f"optim.lr={s.lr}",
        "logging.progress=false",
    ]


def worker(method: str, s: Setting, extra: list[str]) -> dict[str, Any]:
    """Our trainer's `train_step`, timed from outside and by its own `time/*` metrics."""
    from mopd.config import load_config
    from mopd.core.seeding import derive_seed
    from mopd.training.step import train_step
    from mopd.training.trainer import Trainer, training_problems

    cfg = load_config(None, [*our_overrides(method, s), *extra])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir=Path(tempfile.mkdtemp(prefix="step_time-")))
    load_s = time.perf_counter() - t0
    steps: list[dict[str, float]] = []
    for i in range(s.warmup + s.steps):
        problems = training_problems(
            trainer.train_problems, seed=s.seed, start=i * s.prompts, count=s.prompts
        )
        t0, c0 = time.perf_counter(), time.process_time()
        _, metrics = train_step(trainer.parts, problems, seed=derive_seed(s.seed, "step", i))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = s.prompts * s.n
        steps.append(
            {
                "wall_s": wall,
                "cpu_s": cpu,  # CPU time of this process: what other processes' load changes least
                **{k: v for k, v in metrics.items() if k.startswith("time/")},
                "tokens": metrics["rollout/response_tokens_mean"] * rows,
                "success_rate": metrics["rollout/success_rate"],
                "context_fraction": metrics.get("teacher/context_fraction", 0.0),
                "teacher_prompt_tokens": metrics.get("teacher/prompt_tokens_mean", 0.0),
            }
        )
    import mopd

    return {
        "load_s": load_s,
        "steps": steps[s.warmup :],
        "peak_rss_mb": peak_rss_mb(),
        "mopd_path": str(Path(mopd.__file__).parent),
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out = {}
    for variant, rs in runs.items():
        steps = [st for r in rs for st in r["steps"]]
        row = {
            "step_s": mean([st["wall_s"] for st in steps]),
            "step_s_min": min(st["wall_s"] for st in steps),
            "tokens": mean([st["tokens"] for st in steps]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "n_steps": len(steps),
        }
        row["tokens_per_s"] = row["tokens"] / row["step_s"]
        cpu = [st["cpu_s"] for st in steps if "cpu_s" in st]
        if cpu:
            row["cpu_s"] = mean(cpu)
            row["n_cpu_steps"] = len(cpu)
        for k in (*PHASES, "loss_forward", "rest"):
            vals = [st[f"time/{k}"] for st in steps if f"time/{k}" in st]
            if vals:
                row[k] = mean(vals)
        for k in ("context_fraction", "teacher_prompt_tokens", "success_rate"):
            row[k] = mean([st.get(k, float("nan")) for st in steps])
        out[variant] = row
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    cols = ["step_s", "step_s_min", "cpu_s", *PHASES, "loss_forward", "rest", "tokens_per_s"]
    cols += ["peak_rss_mb"]
    cols += ["context_fraction", "teacher_prompt_tokens", "success_rate", "n_steps"]
    rows = [[v, *[r.get(c, "") for c in cols]] for v, r in summary.items()]
    text = sysbench.md_table(["variant", *cols], rows)
    ratios = []
    pairs = (("mopd", "grpo"), ("mopd", "trl-sdpo"), ("sdpo", "trl-sdpo"), ("mopd", "mopd-base"))
    for a, b in pairs:
        if a in summary and b in summary:
            ra, rb = summary[a], summary[b]
            ratios.append(
                [
                    f"{a} / {b}",
                    ra["step_s"] / rb["step_s"],
                    ra["step_s_min"] / rb["step_s_min"],
                    ra.get("cpu_s", math.nan) / rb.get("cpu_s", math.nan),
                    ra["peak_rss_mb"] / rb["peak_rss_mb"],
                    ra["tokens_per_s"] / rb["tokens_per_s"],
                ]
            )
    if ratios:
        headers = ["ratio", "step time (mean)", "step time (min)", "CPU time", "peak RSS"]
        text += "\n\n" + sysbench.md_table([*headers, "tokens/s"], ratios)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--method", required=True)
    w.add_argument("--override", action="append", default=[])
    Setting().add_arguments(w)
    parser.add_argument("--variants", default="grpo,mopd,trl-sdpo")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="key=value for ours")
    parser.add_argument("--baseline-rev", default="HEAD", help="source of mopd-base")
    parser.add_argument("--name", default="step_time")
    parser.add_argument("--resummarize", type=Path, help="recompute the tables of a saved JSON")
    parser.add_argument("--out", type=Path, default=None)
    Setting().add_arguments(parser)
    args = parser.parse_args()
    s = Setting.from_args(args)
    if args.cmd == "worker":
        emit(worker(args.method, s, args.override))
        return
    if args.resummarize:
        data = json.loads(args.resummarize.read_text())
        data["summary"] = summarize(data["runs"])
        sysbench.save(args.resummarize.stem, data, table(data["summary"]), args.out)
        return

    t_start = time.perf_counter()
    variants = args.variants.split(",")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    loads = [sysbench.machine()["load_avg"]]
    base = sysbench.baseline_tree(args.baseline_rev) if "mopd-base" in variants else None
    for r in range(args.rounds):
        for v in variants:
            if v == "trl-sdpo":
                res = run_worker("trl_sdpo.py", s.argv())
            else:
                extra = [a for o in args.override for a in ("--override", o)]
                argv = ["worker", "--method", OURS[v], *s.argv(), *extra]
                res = run_worker(
                    "step_time.py", argv, pythonpath=base if v == "mopd-base" else None
                )
            runs[v].append(res)
            loads.append(sysbench.machine()["load_avg"])
            print(
                f"round {r} {v}: {[round(st['wall_s'], 2) for st in res['steps']]} s",
                file=sys.stderr,
            )
    summary = summarize(runs)
    data = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setting": vars(s),
        "overrides": args.override,
        "baseline_rev": args.baseline_rev if base else None,
        "machine": sysbench.machine(),
        "load_avg_between_runs": loads,
        "wall_s": time.perf_counter() - t_start,
        "summary": summary,
        "runs": runs,
    }
    sysbench.save(args.name, data, table(summary), args.out)


if __name__ == "__main__":
    main()
