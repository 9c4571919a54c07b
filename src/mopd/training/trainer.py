"""The training loop: build everything from a Config, run steps, evaluate, checkpoint, report.

Determinism: every random draw is derived from the run seed and the step number
(`derive_seed`), never from global RNG state, so a resumed run replays exactly what an
uninterrupted one would. Evaluation reuses one fixed seed at every evaluation point
(common random numbers), so changes between evaluations reflect the model rather than
sampling noise.

Several processes (launched by `torchrun` or `accelerate launch`, see
`training.distributed`) train one model together: every process runs this loop on its
rollout shards of each step, and the step reduces gradients and metrics, so all processes
hold the same weights and the same metrics. Rank 0 alone picks the run folder, evaluates
(the others wait for its metrics: evaluation uses the same seed and prompts as a
single-process run), writes metrics, rollouts, checkpoints and the report, and shows
progress. A resumed run loads the checkpoint on every process; it must use the same
number of rollout shards, i.e. the same process count unless `train.rollout_shards` is
set.

With ``train.parallel=fsdp`` (several processes) the student and the teachers copied
from it are sharded (`models.sharding`), so every forward is a collective: all
processes evaluate (the same prompts and seed, rank 0's metrics are kept) and all take
part in each checkpoint, which rank 0 writes; `training.lockstep` keeps the step's
forwards and backwards in step.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mopd.collect.shards import local_shards, shard_count
from mopd.config import Config, save_config, to_dict
from mopd.core.seeding import derive_seed
from mopd.errors import RunFolderError
from mopd.evaluation.evaluate import evaluate
from mopd.models.teachers import Teacher
from mopd.reporting.report import eval_line, eval_summary_rows, summary_table, write_report
from mopd.reporting.sinks import (
    METRICS_FILE,
    MultiSink,
    build_sinks,
    keep_rows_through,
    read_metrics,
)
from mopd.rollout.base import SamplingParams
from mopd.tasks.base import Task
from mopd.tasks.registry import TaskError, build_task
from mopd.training.build import build_run, process_device, resolve_device
from mopd.training.checkpoint import (
    TrainerState,
    clean_checkpoints,
    latest_checkpoint,
    save_checkpoint,
)
from mopd.training.distributed import init_distributed
from mopd.training.interrupt import StopRequest, TrainingInterrupted
from mopd.training.records import (
    FULL_ROLLOUTS_FILE,
    SAMPLES_FILE,
    append_full_records,
    append_records,
    rollout_records,
)
from mopd.training.runlock import LOCK_FILE, RunLock
from mopd.training.step import StepOutput, train_step
from mopd.types import Problem


def _merge_outputs(outputs: Sequence[StepOutput]) -> StepOutput:
    """The processes' step outputs as one, groups in rank order (= the step's prompt order)."""

    def cat(name: str) -> Any:
        parts = [getattr(o, name) for o in outputs]
        return None if parts[0] is None else [x for part in parts for x in part]

    return StepOutput(
        *(cat(n) for n in ("problems", "groups", "verdicts", "teacher_inputs", "teacher_scores"))
    )


def training_problems(
    problems: Sequence[Problem], *, seed: int, start: int, count: int
) -> list[Problem]:
    """Prompts `start .. start+count` of an endless stream of seeded per-epoch shuffles."""
    n = len(problems)
    out: list[Problem] = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(derive_seed(seed, "epoch", epoch)).shuffle(order)
        out.append(problems[order[offset]])
    return out


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Owns the models and the loop. `Trainer(config).train()` runs a whole recipe."""

    def __init__(
        self, config: Config, *, run_dir: Path | None = None, resume: bool = False
    ) -> None:
        self.config = config
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        self.dist = init_distributed(
            resolve_device(config.model.device).type,
            timeout_minutes=config.train.dist_timeout_minutes,
        )
        self.device = process_device(config.model.device, self.dist)
        self.sharded = config.train.parallel == "fsdp" and self.dist.world_size > 1
        shards = shard_count(config.train.rollout_shards, self.dist.world_size)
        local_shards(config.train.prompts_per_step, shards, self.dist.world_size, self.dist.rank)
        self.task: Task = build_task(config.task.name, config.task.options)
        self.train_problems = list(self.task.train_problems())
        if not self.train_problems:
            raise TaskError(f"task {config.task.name!r} has no training problems")
        eval_problems = list(self.task.eval_problems())
        if not eval_problems:  # before any model loads: evaluation needs held-out prompts
            raise TaskError(
                f"task {config.task.name!r} has no eval problems: hold some out, e.g. "
                "task.options.n_eval=20"
            )
        self.eval_problems = (
            eval_problems[: config.eval.max_prompts] if config.eval.max_prompts else eval_problems
        )
        # Rank 0 decides (a timestamped name could differ between processes by a second).
        self.run_dir: Path = self.dist.broadcast(run_dir or self._new_run_dir())
        # Before any model loads: one writer per folder, then clear a killed save's leftovers.
        created = not self.run_dir.exists()
        self._lock = RunLock(self.run_dir) if self.dist.is_main else None
        try:
            self.resume_from = self._checkpoint_to_resume(resume)
            self.parts, self.state = build_run(
                config,
                self.task,
                dist=self.dist,
                device=self.device,
                shards=shards,
                resume_from=self.resume_from,
            )
        except BaseException:  # a failed start leaves the folder as it found it, unlocked
            self._release()
            if created and self.dist.is_main:
                (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # only if nothing else was written
                    self.run_dir.rmdir()
            raise
        self.dist = self.parts.dist  # with a lockstep when sharded
        self._full_rollouts_capped = False

    # ------------------------------------------------------------------ set-up
    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        """The checkpoint `--resume` continues from (None for a fresh run), after removing
        a killed save's leftovers; refuses a fresh run in a folder that has checkpoints and
        a resume without one."""
        if self.dist.is_main:
            clean_checkpoints(self.run_dir)
        latest = self.dist.broadcast(latest_checkpoint(self.run_dir))
        if resume and latest is None:
            raise RunFolderError(
                f"--resume {self.run_dir}: no complete checkpoint in it (the run stopped before "
                f"its first save); start it over with: mopd train --config "
                f"{self.run_dir / 'config.yaml'} logging.run_name=<new name>"
            )
        if not resume and latest is not None:
            raise RunFolderError(
                f"{self.run_dir} holds checkpoints of an earlier training: continue it with "
                f"mopd train --resume {self.run_dir}, or give this one another logging.run_name"
            )
        return latest if resume else None

    def _new_run_dir(self) -> Path:
        cfg = self.config
        name = cfg.logging.run_name or (
            f"{cfg.method}-{cfg.task.name.replace(':', '_').replace('.', '_')}-"
            f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        )
        return Path(cfg.logging.output_dir) / name

    @property
    def student(self) -> Any:
        return self.parts.student

    @property
    def teacher(self) -> Teacher | None:
        return self.parts.teacher

    # ------------------------------------------------------------------ loop
    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """Eval metrics of the current student: computed on rank 0, returned on every rank.

        A sharded student needs every process in its forwards: all processes evaluate the
        same prompts with the same seed, and rank 0's metrics are kept. With progress on,
        rank 0 shows a bar while sampling and prints the score when it lands.
        """
        here = self.sharded or self.dist.is_main
        show = self.config.logging.progress and self.dist.is_main and step is not None
        label = f"eval at step {step}" if show else None
        metrics = self.dist.broadcast(self._evaluate_here(label) if here else {})
        if show:
            tqdm.write(f"{label}: {eval_line(metrics)}", file=sys.stderr)
        return metrics

    def _evaluate_here(self, progress: str | None = None) -> dict[str, float]:
        cfg = self.config
        params = SamplingParams(
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        )
        t0 = time.perf_counter()
        metrics = evaluate(
            self.parts.engine,
            self.parts.tokenizer,
            self.task,
            self.eval_problems,
            k=cfg.eval.k,
            params=params,
            seed=derive_seed(cfg.train.seed, "eval"),
            progress=progress,
        )
        metrics["time/eval"] = time.perf_counter() - t0
        return metrics

    def _save_samples(self, step: int, output: StepOutput) -> None:
        n = self.config.train.rollout_samples_per_step
        records = rollout_records(step, output, full=False, max_groups=n)
        append_records(self.run_dir / SAMPLES_FILE, records)

    def _save_all(self, step: int, output: StepOutput) -> None:
        """Every rollout of the step, for `mopd analyze`; stops at the configured file size."""
        path = self.run_dir / FULL_ROLLOUTS_FILE
        cap = self.config.train.all_rollouts_max_mb * 2**20
        if not append_full_records(path, step, output, cap_bytes=cap) and not (
            self._full_rollouts_capped
        ):
            print(f"mopd: {path} reached train.all_rollouts_max_mb; not appending", file=sys.stderr)
            self._full_rollouts_capped = True

    def _checkpoint(self, merged: bool = True) -> None:
        """Rank 0 writes; with a sharded student every process helps gather the states.
        `merged`: also a LoRA student's merged model (see `save_checkpoint`)."""
        if not (self.sharded or self.dist.is_main):
            return
        save_checkpoint(
            self.run_dir,
            state=self.state,
            student=self.parts.student,
            tokenizer=self.parts.tokenizer,
            optimizer=self.parts.optimizer,
            scheduler=self.parts.scheduler,
            teacher=self.parts.teacher,
            reference=self.parts.reference,
            keep_last=self.config.train.keep_checkpoints,
            write=self.dist.is_main,
            merged=merged,
        )

    def train(self) -> RunResult:
        cfg, main = self.config, self.dist.is_main
        resumed = self.resume_from is not None
        sinks = MultiSink([])  # other ranks log nothing
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            sinks = build_sinks(
                self.run_dir,
                cfg.logging.sinks,
                run_name=self.run_dir.name,
                config_dict=to_dict(cfg),
                resume_from_step=self.state.step if resumed else None,
            )
        if main and resumed:  # rows of steps after the checkpoint are replayed: drop them
            for name in (SAMPLES_FILE, FULL_ROLLOUTS_FILE):
                keep_rows_through(self.run_dir / name, self.state.step)
        result = RunResult(self.run_dir)
        try:
            with StopRequest() as stop:  # Ctrl-C: finish the step, checkpoint, stop
                self._loop(result, sinks, stop)
            if main:
                write_report(
                    self.run_dir,
                    title=f"{cfg.method} on {cfg.task.name}",
                    config_summary=_summary(cfg),
                )
            self.dist.barrier()  # on every rank, train() returns once the files are written
        finally:
            self._release()
        return result

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _loop(self, result: RunResult, sinks: MultiSink, stop: StopRequest) -> None:
        """Steps until `train.steps`; after a stop request, checkpoint and raise."""
        cfg, main = self.config, self.dist.is_main
        resumed, every = self.resume_from is not None, cfg.eval.every
        try:
            if not resumed and cfg.eval.at_start:
                ev = self.evaluate(0)
                sinks.log(0, ev)
                result.evals.append({"step": 0, **ev})
            bar = tqdm(
                total=cfg.train.steps,
                initial=self.state.step,
                desc=f"{cfg.method}",
                disable=not (cfg.logging.progress and main),
                dynamic_ncols=True,
            )
            while self.state.step < cfg.train.steps:
                step = self.state.step + 1
                problems = training_problems(
                    self.train_problems,
                    seed=cfg.train.seed,
                    start=self.state.data_position,
                    count=cfg.train.prompts_per_step,
                )
                output, metrics = train_step(
                    self.parts, problems, seed=derive_seed(cfg.train.seed, "step", step)
                )
                self.state = TrainerState(
                    step, self.state.data_position + len(problems), self.state.rollout_shards
                )
                if self.dist.lockstep is not None:  # dummy passes run to keep processes in step
                    mirrored = {"n": self.dist.lockstep.take_mirrored()}
                    metrics["perf/lockstep_mirrored"] = self.dist.sum(mirrored)["n"]
                if every and step % every == 0 and step != cfg.train.steps:
                    ev = self.evaluate(step)
                    metrics.update(ev)
                    result.evals.append({"step": step, **ev})
                if step == cfg.train.steps:
                    ev = self.evaluate(step)
                    metrics.update(ev)
                    result.evals.append({"step": step, **ev})
                sinks.log(step, metrics)
                result.history.append({"step": step, **metrics})
                if cfg.train.save_rollouts or cfg.train.save_all_rollouts:
                    output = _merge_outputs(self.dist.gather(output))
                if main and cfg.train.save_rollouts:
                    self._save_samples(step, output)
                if main and cfg.train.save_all_rollouts:
                    self._save_all(step, output)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{metrics['rollout/reward_mean']:.2f}",
                    loss=f"{metrics['loss/total']:.4f}",
                    ctx=f"{metrics.get('teacher/context_fraction', float('nan')):.2f}",
                )
                periodic = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
                last = step == cfg.train.steps or stop.requested  # what users load
                if periodic or last:
                    self._checkpoint(merged=last)
                if stop.requested and step < cfg.train.steps:
                    bar.close()
                    raise TrainingInterrupted(self.run_dir, step)
            bar.close()
        finally:
            sinks.close()


def _summary(cfg: Config) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "steps": cfg.train.steps,
        "prompts x rollouts": f"{cfg.train.prompts_per_step} x {cfg.rollout.n}",
        "max new tokens": cfg.rollout.max_new_tokens,
        "lr": cfg.optim.lr,
        "peers (S, F)": f"{cfg.peers.n_success}, {cfg.peers.n_failure}",
        "teacher": cfg.teacher.kind,
    }


def final_summary(result: RunResult) -> str:
    """The terminal table printed at the end of `mopd train`: the run's first evaluation
    against its last, read back from the run folder so that a resumed run compares with
    the evaluation before its first step, not with its own last one."""
    path = result.run_dir / METRICS_FILE
    rows = eval_summary_rows(read_metrics(path) if path.exists() else result.evals)
    return summary_table(rows, headers=("metric", "before", "after"))
