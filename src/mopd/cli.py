"""Command line: ``mopd train``, ``mopd eval``, ``mopd analyze`` and ``mopd report``.

Configuration errors are reported before any model is loaded, naming the key to fix.
Commands that load models import torch and transformers lazily, so ``--help`` and
``mopd report`` stay fast.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mopd.config import (
    METHODS,
    ConfigError,
    key_help,
    load_config,
    load_saved_config,
    loss_kinds,
    to_dict,
    valid_keys,
)
from mopd.errors import ModelNotFoundError, RunFolderError, UnusableModelError
from mopd.tasks.registry import TaskError

if TYPE_CHECKING:
    from mopd.evaluation.evaluate import EvalSamples


def _options_help(argv: Sequence[str]) -> str:
    """Every key with the value the recipe and overrides in `argv` give it, and its help."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    given += [b for a, b in itertools.pairwise(argv) if a == "--config"]
    recipe = given[-1] if given else "demo"
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        config, shown = load_config(recipe, overrides), f"recipe {recipe}"
        if overrides:
            shown += " with " + " ".join(overrides)
    except Exception as error:  # any bad input: the real run reports it; help shows the demo's
        config, shown = load_config("demo"), f"recipe demo ({type(error).__name__}: {error})"
    values, helps = to_dict(config), key_help()
    rows = []
    for key in valid_keys():
        value: object = values
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        rows.append((f"{key} = {json.dumps(value)}", helps.get(key, "")))
    width = min(max(len(left) for left, _ in rows), 44)
    lines = [f"settable keys (key=value, dotted), with the values of {shown}:"]
    lines += [f"  {left:<{width}}  {text}".rstrip() for left, text in rows]
    lines.append(f"methods: {', '.join(METHODS)}  (e.g. method=grpo)")
    lines.append(f"objectives: {', '.join(loss_kinds())}  (loss.kind=..., mopd.objectives)")
    return "\n".join(lines)


def _default_conditions() -> tuple[str, ...]:
    from mopd.core.peers import NAMED_CONTEXTS

    return (*NAMED_CONTEXTS, "random_peer", "unrelated_prompt")


def _sampling_args(
    parser: argparse.ArgumentParser,
    *,
    temperature: float | None,
    top_p: float | None,
    max_new_tokens: int | None = 64,
    seed: int | None = 0,
    dtype: str | None = "float32",
) -> None:
    """Sampling options; a None default means "decided later" (``mopd eval --run``)."""
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)


# `mopd eval` without --run: these; with --run, the run's own evaluation settings.
EVAL_DEFAULTS: dict[str, Any] = {
    "k": 8,
    "temperature": 0.6,
    "top_p": 0.95,
    "max_new_tokens": 64,
    "seed": 0,
    "dtype": "float32",
    "batch_size": 64,
}


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mopd", description="Multi-Rollout On-Policy Distillation for language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model (default: the offline demo recipe)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_options_help(argv) if "-h" in argv or "--help" in argv else None,
    )
    train.add_argument("--config", help="YAML recipe file or packaged recipe name (default: demo)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run folder")
    train.add_argument("overrides", nargs="*", metavar="key=value")

    ev = sub.add_parser(
        "eval", help="mean@k and pass@1..k with bootstrap CIs of models on tasks' eval prompts"
    )
    ev.add_argument(
        "--model",
        action="append",
        default=[],
        help="HF id, local folder, or packaged:NAME (repeat to compare models)",
    )
    ev.add_argument(
        "--run",
        type=Path,
        metavar="RUN_DIR",
        help="evaluate the checkpoints of this run folder, by default with the run's own "
        "task, evaluation prompts, sampling settings, seed and dtype (so the in-training "
        "scores reproduce); options given here override them",
    )
    ev.add_argument(
        "--task",
        action="append",
        default=[],
        help="task name or module:factory (repeat for several; default arithmetic)",
    )
    ev.add_argument(
        "--k",
        type=int,
        default=None,
        help="samples per prompt; pass@1..k are reported (default 8, or the run's eval.k)",
    )
    _sampling_args(ev, temperature=None, top_p=None, max_new_tokens=None, seed=None, dtype=None)
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    ev.add_argument(
        "--batch-size", type=int, default=None, help="rows per generate call (default 64)"
    )
    ev.add_argument("--output", type=Path, help="write the results as JSON here (and a .md table)")
    ev.add_argument(
        "--samples",
        type=Path,
        metavar="JSONL",
        help="also write every sample here: one line per model, task and prompt, with the "
        "responses, their rewards and token counts",
    )
    ev.add_argument("options", nargs="*", metavar="option=value", help="task options")

    an = sub.add_parser(
        "analyze",
        help="teacher-signal analysis: does each context make teacher scores follow rewards?",
    )
    an.add_argument("--model", required=True, help="student (and default teacher) model")
    an.add_argument("--teacher", help="score with this model instead (same tokenizer)")
    an.add_argument("--task", default="arithmetic", help="task name or module:factory")
    an.add_argument(
        "--rollouts",
        type=Path,
        help="read groups from a run's rollouts_full.jsonl / rollouts.jsonl instead of sampling",
    )
    an.add_argument("--conditions", default=",".join(_default_conditions()))
    an.add_argument(
        "--layouts",
        default="paper",
        help="teacher layouts to score each condition in, e.g. paper,multi-turn,summaries",
    )
    an.add_argument("--control-base", default="2S1F", help="named context the controls match")
    an.add_argument("--policy", default="random", choices=["random", "first", "shortest"])
    an.add_argument("--n", type=int, default=8, help="rollouts per prompt (group size G)")
    _sampling_args(an, temperature=1.0, top_p=1.0)
    an.add_argument("--max-teacher-tokens", type=int, default=4096)
    an.add_argument(
        "--score-temperature",
        type=float,
        default=1.0,
        help="read teacher and student at softmax(logits / T): the loss temperature",
    )
    an.add_argument("--batch-size", type=int, default=8, help="rows per scoring forward")
    an.add_argument("--n-boot", type=int, default=1000)
    an.add_argument("--output-dir", type=Path, default=Path("analysis"))
    an.add_argument("options", nargs="*", metavar="option=value", help="task options")

    rep = sub.add_parser("report", help="one page (markdown + PNGs) comparing run folders")
    rep.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    rep.add_argument("--output", type=Path, default=Path("compare"), help="output folder")
    rep.add_argument("--title", default="Run comparison")
    return parser


def _quiet_libraries() -> None:
    """The console shows mopd's own progress; transformers' per-load and per-save bars
    ("Loading weights", "Writing model shards") would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _train(args: argparse.Namespace) -> int:
    from mopd.training.trainer import Trainer, final_summary

    _quiet_libraries()

    if args.resume is not None:
        if args.config:
            raise ConfigError("--resume uses the run's saved config.yaml; drop --config")
        config = load_saved_config(args.resume / "config.yaml", args.overrides)
        trainer = Trainer(config, run_dir=args.resume, resume=True)
    else:
        config = load_config(args.config or "demo", args.overrides)
        trainer = Trainer(config)
    from mopd.training.interrupt import TrainingInterrupted

    main = trainer.dist.is_main  # under torchrun / accelerate launch only rank 0 prints
    try:
        if main:
            print(f"run folder: {trainer.run_dir}", file=sys.stderr)
        result = trainer.train()
    except TrainingInterrupted as stopped:
        if main:
            print(
                f"mopd: stopped after step {stopped.step}; checkpoint saved. Continue with:\n"
                f"  mopd train --resume {stopped.run_dir}",
                file=sys.stderr,
            )
        return 130
    finally:
        trainer.dist.close()
    if main:
        print(final_summary(result))
        print(f"\nreport: {result.run_dir / 'report.md'}")
    return 0


def _task_options(options: Sequence[str]) -> dict[str, object]:
    return dict(load_config(None, [f"task.options.{o}" for o in options]).task.options)


def _eval_models(args: argparse.Namespace) -> list[tuple[str, int | None, str | None]]:
    """(model, step, base) triples: --model values, then the checkpoints of --run by step.

    `base` is set for a LoRA adapter folder: the student is that base with the adapter
    on top, exactly as trained (the merged ``student/`` copy rounds the update to the
    weights' dtype). --run takes each checkpoint's ``adapter/`` where it has one, so
    a LoRA run's periodic checkpoints are evaluated too, on the run's own base model.
    """
    if not args.model and args.run is None:
        raise ConfigError("mopd eval needs --model PATH (repeatable) or --run RUN_DIR")
    from mopd.models.lora import adapter_base_name, is_adapter_dir
    from mopd.training.checkpoint import is_complete

    models: list[tuple[str, int | None, str | None]] = []
    for name in args.model:
        base = adapter_base_name(name) if is_adapter_dir(name) else None
        if base is not None and Path(base).is_absolute() and not Path(base).exists():
            raise ModelNotFoundError(
                f"{name}: its base model {base!r} (adapter_config.json) does not exist here"
            )
        models.append((name, None, base))
    if args.run is not None:
        base = load_saved_config(args.run / "config.yaml").model.name
        for folder in sorted((args.run / "checkpoints").glob("step-*")):
            if not is_complete(folder):  # being written or pruned
                continue
            step = int(folder.name.removeprefix("step-"))
            if is_adapter_dir(folder / "adapter"):
                models.append((str(folder / "adapter"), step, base))
            elif (folder / "student").is_dir():
                models.append((str(folder / "student"), step, None))
        if len(models) == len(args.model):
            raise ConfigError(
                f"--run {args.run}: no checkpoints/step-*/student or adapter folders in it"
            )
    return models


def _eval_settings(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Fill the options not given on the command line (EVAL_DEFAULTS, or with --run the
    run's own evaluation) into `args`; returns the task options and where they came from."""
    from mopd.core.seeding import derive_seed

    fallback, source = dict(EVAL_DEFAULTS), "defaults"
    options = _task_options(args.options)
    args.cache_dir, args.packed_weights = None, True  # how models load and sample
    if args.run is not None:
        cfg = load_saved_config(args.run / "config.yaml")
        args.cache_dir, args.packed_weights = cfg.model.cache_dir, cfg.model.packed_weights
        fallback.update(
            k=cfg.eval.k,
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            seed=derive_seed(cfg.train.seed, "eval"),  # the trainer's evaluation seed
            dtype=cfg.model.dtype,
            max_prompts=cfg.eval.max_prompts,
            batch_size=cfg.rollout.batch_size,  # rows per generate call: part of the stream
        )
        if not args.task:
            args.task, options = [cfg.task.name], {**cfg.task.options, **options}
        source = f"{args.run / 'config.yaml'}"
    for key, value in fallback.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.task = args.task or ["arithmetic"]
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    return options, source


def _eval(args: argparse.Namespace) -> int:
    options, source = _eval_settings(args)
    models = _eval_models(args)
    _quiet_libraries()
    shown = {key: getattr(args, key) for key in (*EVAL_DEFAULTS, "max_prompts")}
    used = (
        f"evaluating on {', '.join(args.task)} {options or ''} with "
        + " ".join(f"{key}={value}" for key, value in shown.items())
        + f" (unset options from {source})"
    )
    import torch

    from mopd.evaluation.evaluate import eval_metrics, sample_and_verify, summarize_samples
    from mopd.models.loading import load_model, load_tokenizer
    from mopd.models.lora import load_adapted
    from mopd.reporting.report import summary_table
    from mopd.rollout.base import SamplingParams
    from mopd.rollout.hf import HFRolloutEngine
    from mopd.tasks.registry import build_task

    tasks = {name: build_task(name, options) for name in args.task}
    torch.set_num_threads(args.threads)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    results: list[dict[str, Any]] = []
    table: list[list[str]] = []
    # pass@1 is in the .md file: with 0/1 rewards it repeats mean@k.
    names = [f"mean@{args.k}", *([f"pass@{args.k}"] if args.k > 1 else [])]
    for model_name, step, base in models:
        # An adapter keeps its base's tokenizer.
        tokenizer = load_tokenizer(base or model_name, cache_dir=args.cache_dir)
        model = load_model(base or model_name, dtype=args.dtype, cache_dir=args.cache_dir)
        if base is not None:
            model = load_adapted(model_name, model)
        engine = HFRolloutEngine(
            model, tokenizer, batch_size=args.batch_size, packed_weights=args.packed_weights
        )
        if not results:  # once a model is found: what the numbers below were made with
            print(used, file=sys.stderr)
        samples = {
            name: sample_and_verify(
                engine,
                tokenizer,
                task,
                list(task.eval_problems())[: args.max_prompts],
                k=args.k,
                params=params,
                seed=args.seed,
                progress=f"{model_name if step is None else f'step {step}'} on {name}",
            )
            for name, task in tasks.items()
        }
        if args.samples:
            _append_samples(args.samples, model_name, step, samples, fresh=not results)
        summary = summarize_samples(samples, args.k, n_boot=args.n_boot, seed=args.seed)
        flat = eval_metrics(_pooled(samples), args.k, n_boot=args.n_boot)
        results.append({"model": model_name, "step": step, "metrics": flat, **summary})
        for scope, block in [*summary["tasks"].items(), ("overall", summary["overall"])]:
            if scope == "overall" and len(tasks) == 1:
                continue
            m = block["metrics"]
            table.append(
                [model_name if step is None else f"step {step}", scope]
                + [_ci_text(m[key]) for key in names]
            )
    headers = ("model", "task", *names)
    print(summary_table(table, headers=headers))
    if args.output:
        payload = {
            "k": args.k,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "results": results,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(payload, indent=2))
        args.output.with_suffix(".md").write_text(_eval_markdown(results, args.k))
        print(f"\nwrote {args.output} and {args.output.with_suffix('.md')}", file=sys.stderr)
    return 0


def _append_samples(
    path: Path, model: str, step: int | None, samples: dict[str, EvalSamples], *, fresh: bool
) -> None:
    """One JSON line per task and prompt of `model`'s samples; `fresh`: start the file."""
    lines = [
        json.dumps(
            {
                "model": model,
                "step": step,
                "task": task,
                "problem_id": problem_id,
                "rewards": rewards,
                "response_tokens": tokens,
                "texts": texts,
            }
        )
        for task, s in samples.items()
        for problem_id, rewards, tokens, texts in zip(
            s.problem_ids, s.rewards, s.response_tokens, s.texts, strict=True
        )
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if fresh else "a") as handle:
        handle.write("".join(line + "\n" for line in lines))


def _pooled(samples: dict[str, EvalSamples]) -> EvalSamples:
    from mopd.evaluation.evaluate import EvalSamples

    parts = list(samples.values())
    return EvalSamples(
        [i for s in parts for i in s.problem_ids],
        [r for s in parts for r in s.rewards],
        [t for s in parts for t in s.texts],
        [n for s in parts for n in s.response_tokens],
    )


def _ci_text(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def _eval_markdown(results: list[dict[str, Any]], k: int) -> str:
    """One row per (model, scope): mean@k and every pass@j with its CI, then diversity."""
    from mopd.reporting.report import md_table

    names = [f"mean@{k}", *(f"pass@{j}" for j in range(1, k + 1))]
    rows = []
    for result in results:
        label = str(result["model"]) if result["step"] is None else f"step {result['step']}"
        blocks = {**result["tasks"], "overall": result["overall"]}
        for scope, block in blocks.items():
            cells = [_ci_text(block["metrics"][n]) for n in names]
            diversity = block["diversity"].get("self_bleu")
            rows.append([label, scope, block["n_prompts"], *cells, _fmt(diversity)])
    table = md_table(("model", "task", "prompts", *names, "self-BLEU"), rows)
    return (
        f"# Evaluation ({k} samples per prompt)\n\nBrackets: 95% bootstrap interval over "
        "prompts. pass@j: unbiased estimator from the k samples.\n\n" + table + "\n"
    )


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def _analyze(args: argparse.Namespace) -> int:
    from mopd.core.prompts import LAYOUTS
    from mopd.evaluation.analysis import condition_config

    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    try:  # validate the condition names before any model loads
        for c in conditions:
            condition_config(c, control_base=args.control_base, policy=args.policy)
    except ValueError as exc:
        raise ConfigError(f"--conditions: {exc}") from exc
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown or not layouts:
        raise ConfigError(f"--layouts: got {args.layouts!r}, expected some of {list(LAYOUTS)}")
    import torch

    from mopd.evaluation.analysis import (
        SIGNAL_HEADERS,
        analyze_groups,
        load_rollout_groups,
        sample_groups,
        signal_rows,
        write_analysis,
    )
    from mopd.models.loading import load_model, load_tokenizer
    from mopd.models.packing import packed_linears
    from mopd.reporting.report import summary_table
    from mopd.rollout.base import SamplingParams
    from mopd.rollout.hf import HFRolloutEngine
    from mopd.tasks.registry import build_task

    torch.set_num_threads(args.threads)
    _quiet_libraries()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype)
    teacher = load_model(args.teacher, dtype=args.dtype) if args.teacher else None
    if args.rollouts is not None:
        problems, groups, verdicts = load_rollout_groups(
            args.rollouts, tokenizer, max_groups=args.max_prompts
        )
    else:
        task = build_task(args.task, _task_options(args.options))
        problems = list(task.eval_problems())[: args.max_prompts]
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
        )
        groups, verdicts = sample_groups(
            HFRolloutEngine(model, tokenizer),
            tokenizer,
            task,
            problems,
            n=args.n,
            params=params,
            seed=args.seed,
            progress="sampling",
        )
    with packed_linears(model, teacher):  # neither model changes during the analysis
        result = analyze_groups(
            model,
            tokenizer,
            problems,
            groups,
            verdicts,
            conditions,
            teacher=teacher,
            seed=args.seed,
            control_base=args.control_base,
            policy=args.policy,
            max_prompt_tokens=args.max_teacher_tokens,
            batch_size=args.batch_size,
            n_boot=args.n_boot,
            layouts=layouts,
            temperature=args.score_temperature,
            progress=True,
        )
    result.meta.update(
        model=args.model,
        teacher=args.teacher or args.model,
        source=str(args.rollouts) if args.rollouts else args.task,
    )
    source = args.rollouts.name if args.rollouts else args.task
    paths = write_analysis(result, args.output_dir, title=f"Teacher signal on {source}")
    print(summary_table(signal_rows(result), headers=SIGNAL_HEADERS))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from mopd.reporting.compare import write_comparison

    try:
        path = write_comparison(args.runs, args.output, title=args.title)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"report: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(argv).parse_args(argv)
    try:
        commands = {"train": _train, "eval": _eval, "analyze": _analyze, "report": _report}
        return commands[args.command](args)
    except (ConfigError, TaskError, ModelNotFoundError, RunFolderError, UnusableModelError) as exc:
        print(f"mopd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C in training, or any Ctrl-C elsewhere
        print("\nmopd: interrupted (work since the last checkpoint is lost)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
