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

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh
from tqdm.auto import tqdm

from mopd.config import Config, ConfigError, save_config, to_dict
from mopd.core.peers import derive_seed
from mopd.models.loading import (
    apply_memory_options,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from mopd.models.lora import add_lora, base_model
from mopd.models.sharding import is_sharded, shard_model
from mopd.models.teachers import Teacher, build_teacher, check_same_vocabulary
from mopd.reporting.report import eval_summary_rows, summary_table, write_report
from mopd.reporting.sinks import MultiSink, build_sinks
from mopd.rollout.base import RolloutEngine, SamplingParams
from mopd.rollout.factory import build_engine
from mopd.tasks.base import Task
from mopd.tasks.registry import build_task
from mopd.training.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from mopd.training.distributed import Distributed, init_distributed
from mopd.training.evaluate import evaluate
from mopd.training.lockstep import Lockstep
from mopd.training.records import (
    FULL_ROLLOUTS_FILE,
    SAMPLES_FILE,
    append_full_records,
    append_records,
    rollout_records,
)
from mopd.training.shards import local_shards, shard_count
from mopd.training.step import StepModules, StepOutput, train_step
from mopd.types import Problem


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit device that is missing fails clearly."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={name!r} but CUDA is not available; use model.device=cpu")
    return device


def process_device(name: str, dist: Distributed) -> torch.device:
    """`resolve_device`, with each of several processes on its own GPU (cuda:LOCAL_RANK)."""
    device = resolve_device(name)
    if dist.world_size == 1 or device.type != "cuda":
        return device
    if device.index not in (None, dist.local_rank):
        raise ConfigError(
            f"model.device={name!r} with {dist.world_size} processes: use 'auto' or 'cuda', "
            "each process then takes the GPU of its LOCAL_RANK"
        )
    return torch.device("cuda", dist.local_rank)


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
            raise ValueError(f"task {config.task.name!r} has no training problems")
        eval_problems = list(self.task.eval_problems())
        self.eval_problems = (
            eval_problems[: config.eval.max_prompts] if config.eval.max_prompts else eval_problems
        )
        # Rank 0 decides (a timestamped name could differ between processes by a second).
        self.run_dir: Path = self.dist.broadcast(run_dir or self._new_run_dir())
        self.resume_from = self.dist.broadcast(latest_checkpoint(self.run_dir) if resume else None)
        if resume and self.resume_from is None:
            raise FileNotFoundError(f"--resume {self.run_dir}: no complete checkpoint found in it")
        self._build_models()
        self._full_rollouts_capped = False

    # ------------------------------------------------------------------ set-up
    def _new_run_dir(self) -> Path:
        cfg = self.config
        name = cfg.logging.run_name or (
            f"{cfg.method}-{cfg.task.name.replace(':', '_').replace('.', '_')}-"
            f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        )
        return Path(cfg.logging.output_dir) / name

    def _build_models(self) -> None:
        cfg = self.config
        source = str(self.resume_from / "student") if self.resume_from else cfg.model.name
        lora = cfg.model.lora
        self.tokenizer = load_tokenizer(source, cache_dir=cfg.model.cache_dir)
        # With adapters the frozen base always comes from model.name (checkpoints hold
        # the merged model for users and the adapter for resuming; see models/lora.py).
        weights = cfg.model.name if lora.r else source
        self.student = load_model(weights, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir)
        if self.sharded:  # this process keeps 1/W of every weight, on its device
            mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
            shard_model(self.student, mesh)
        else:  # Module.to directly: transformers' typed wrapper of `.to` rejects a torch.device
            torch.nn.Module.to(self.student, self.device)
        if lora.r:
            adapter = self.resume_from / "adapter" if self.resume_from else None
            self.student = add_lora(
                self.student,
                r=lora.r,
                alpha=lora.alpha,
                dropout=lora.dropout,
                target_modules=lora.target_modules,
                seed=derive_seed(cfg.train.seed, "lora"),
                adapter_dir=adapter,
            )
        apply_memory_options(
            base_model(self.student),
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            autocast=cfg.model.autocast,
        )
        self.teacher: Teacher | None = None
        self.reference: Teacher | None = None
        distill = cfg.loss.kind == "distill" or (cfg.loss.kind == "grpo" and cfg.loss.grpo_mix > 0)
        if distill:
            external = None
            if cfg.teacher.kind == "external":
                assert cfg.teacher.external_model is not None
                external = load_model(
                    cfg.teacher.external_model, dtype=cfg.model.dtype, cache_dir=cfg.model.cache_dir
                )
                external_tok = load_tokenizer(
                    cfg.teacher.external_model, cache_dir=cfg.model.cache_dir
                )
                check_same_vocabulary(self.tokenizer, external_tok, self.student, external)
            self.teacher = build_teacher(
                cfg.teacher.kind,
                self.student,
                rate=cfg.teacher.ema_rate,
                mix=cfg.teacher.trust_region_mix,
                external_model=external,
            )
        if cfg.loss.kind == "dpo":
            self.reference = build_teacher("ema", self.student, rate=0.0)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.student.parameters() if p.requires_grad],  # LoRA: adapters only
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            betas=cfg.optim.betas,
        )
        warmup = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0
        )
        self.engine: RolloutEngine = build_engine(
            cfg.rollout,
            student=self.student,
            tokenizer=self.tokenizer,
            model_path=resolve_model_path(weights, cfg.model.cache_dir),
            world_size=self.dist.world_size,
            seed=cfg.train.seed,
        )
        shards = shard_count(cfg.train.rollout_shards, self.dist.world_size)
        self.state = TrainerState(step=0, data_position=0, rollout_shards=shards)
        if self.resume_from is not None:
            self.state = load_trainer_state(
                self.resume_from,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                teacher=self.teacher,
                reference=self.reference,
                student=self.student,
            )
            if self.state.rollout_shards != shards:
                raise ConfigError(
                    f"{self.resume_from} was trained with {self.state.rollout_shards} rollout "
                    f"shards per step, this run would use {shards}: resume with "
                    f"{self.state.rollout_shards} processes, or set "
                    f"train.rollout_shards={self.state.rollout_shards}"
                )
        if self.sharded:  # sharded forwards are collectives: keep processes in step
            models = {"student": self.student}
            for name, teacher in (("teacher", self.teacher), ("reference", self.reference)):
                model = getattr(teacher, "model", None)  # an external teacher: not sharded
                if model is not None and is_sharded(model):
                    models[name] = model
            self.dist = replace(self.dist, lockstep=Lockstep(models, device=self.dist.device))
        self.modules = StepModules(
            config=cfg,
            student=self.student,
            tokenizer=self.tokenizer,
            engine=self.engine,
            task=self.task,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            teacher=self.teacher,
            reference=self.reference,
            dist=self.dist,
        )

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> dict[str, float]:
        """Eval metrics of the current student: computed on rank 0, returned on every rank.

        A sharded student needs every process in its forwards: all processes evaluate the
        same prompts with the same seed, and rank 0's metrics are kept.
        """
        here = self.sharded or self.dist.is_main
        return self.dist.broadcast(self._evaluate_here() if here else {})

    def _evaluate_here(self) -> dict[str, float]:
        cfg = self.config
        params = SamplingParams(
            temperature=cfg.eval.temperature,
            top_p=cfg.eval.top_p,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        )
        t0 = time.perf_counter()
        metrics = evaluate(
            self.engine,
            self.tokenizer,
            self.task,
            self.eval_problems,
            k=cfg.eval.k,
            params=params,
            seed=derive_seed(cfg.train.seed, "eval"),
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

    def _checkpoint(self) -> None:
        """Rank 0 writes; with a sharded student every process helps gather the states."""
        if not (self.sharded or self.dist.is_main):
            return
        save_checkpoint(
            self.run_dir,
            state=self.state,
            student=self.student,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            teacher=self.teacher,
            reference=self.reference,
            write=self.dist.is_main,
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
        result = RunResult(self.run_dir)
        every = cfg.eval.every
        try:
            if not resumed:
                ev = self.evaluate()
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
                    self.modules, problems, seed=derive_seed(cfg.train.seed, "step", step)
                )
                self.state = TrainerState(
                    step, self.state.data_position + len(problems), self.state.rollout_shards
                )
                if self.dist.lockstep is not None:  # dummy passes run to keep processes in step
                    mirrored = {"n": self.dist.lockstep.take_mirrored()}
                    metrics["perf/lockstep_mirrored"] = self.dist.sum(mirrored)["n"]
                if every and step % every == 0 and step != cfg.train.steps:
                    ev = self.evaluate()
                    metrics.update(ev)
                    result.evals.append({"step": step, **ev})
                if step == cfg.train.steps:
                    ev = self.evaluate()
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
                if periodic or step == cfg.train.steps:
                    self._checkpoint()
            bar.close()
        finally:
            sinks.close()
        if main:
            write_report(
                self.run_dir,
                title=f"{cfg.method} on {cfg.task.name}",
                config_summary=_summary(cfg),
            )
        self.dist.barrier()  # on every rank, train() returns once the files are written
        return result


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
    """The terminal table printed at the end of `mopd train`."""
    rows = eval_summary_rows(result.evals)
    return summary_table(rows, headers=("metric", "before", "after"))
