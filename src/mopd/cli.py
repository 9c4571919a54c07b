"""Command line: ``mopd train`` and ``mopd eval``.

Configuration errors are reported before any model is loaded, naming the key to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mopd.config import (
    METHODS,
    Config,
    ConfigError,
    load_config,
    load_saved_config,
    to_dict,
    valid_keys,
)


def _options_help() -> str:
    defaults = to_dict(Config())
    lines = ["settable keys (key=value, dotted; defaults shown):"]
    for key in valid_keys():
        value: object = defaults
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        lines.append(f"  {key} = {json.dumps(value)}")
    lines.append(f"methods: {', '.join(METHODS)}  (e.g. method=grpo)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mopd", description="Multi-Rollout On-Policy Distillation for language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model (default: the offline demo recipe)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_options_help(),
    )
    train.add_argument("--config", help="YAML recipe file or packaged recipe name (default: demo)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run folder")
    train.add_argument("overrides", nargs="*", metavar="key=value")

    ev = sub.add_parser("eval", help="mean@k / pass@k of a model on a task's eval prompts")
    ev.add_argument("--model", required=True, help="HF id, local folder, or packaged:NAME")
    ev.add_argument("--task", default="arithmetic", help="task name or module:factory")
    ev.add_argument("--k", type=int, default=8)
    ev.add_argument("--temperature", type=float, default=0.6)
    ev.add_argument("--top-p", type=float, default=0.95)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--max-prompts", type=int, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--output", type=Path, help="write the metrics as JSON here")
    ev.add_argument("options", nargs="*", metavar="option=value", help="task options")
    return parser


def _train(args: argparse.Namespace) -> int:
    from mopd.training.trainer import Trainer, final_summary

    if args.resume is not None:
        if args.config:
            raise ConfigError("--resume uses the run's saved config.yaml; drop --config")
        config = load_saved_config(args.resume / "config.yaml", args.overrides)
        trainer = Trainer(config, run_dir=args.resume, resume=True)
    else:
        config = load_config(args.config or "demo", args.overrides)
        trainer = Trainer(config)
    print(f"run folder: {trainer.run_dir}", file=sys.stderr)
    result = trainer.train()
    print(final_summary(result))
    print(f"\nreport: {result.run_dir / 'report.md'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from mopd.models.loading import load_model, load_tokenizer
    from mopd.reporting.report import summary_table
    from mopd.rollout.base import SamplingParams
    from mopd.rollout.hf import HFRolloutEngine
    from mopd.tasks.registry import build_task
    from mopd.training.evaluate import evaluate

    options = load_config(None, [f"task.options.{o}" for o in args.options]).task.options
    task = build_task(args.task, options)
    problems = list(task.eval_problems())[: args.max_prompts]
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    engine = HFRolloutEngine(model, tokenizer)
    metrics = evaluate(engine, tokenizer, task, problems, k=args.k, params=params, seed=args.seed)
    rows = [(name, f"{value:.4f}", "") for name, value in metrics.items()]
    print(summary_table([(r[0], r[1]) for r in rows], headers=("metric", "value")))  # type: ignore[list-item]
    if args.output:
        args.output.write_text(json.dumps(metrics, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        return _eval(args)
    except ConfigError as exc:
        print(f"mopd: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
