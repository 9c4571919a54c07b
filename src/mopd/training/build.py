"""Building a run's long-lived objects from its Config: models, teacher, optimizer, engine.

The objective decides what is built beyond the student (`mopd.objectives`): a teacher
when it distils, a frozen reference when it compares against the initial policy. A
resumed run restores optimizer, scheduler, teachers and step counters from its
checkpoint (`training.checkpoint`); with adapters the frozen base always comes from
``model.name`` and the adapter from the checkpoint (see `models.lora`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh

from mopd.config import Config, ConfigError
from mopd.core.seeding import derive_seed
from mopd.models.loading import apply_memory_options, load_model, load_tokenizer, resolve_model_path
from mopd.models.lora import add_lora, base_model
from mopd.models.sharding import is_sharded, shard_model
from mopd.models.teachers import Teacher, build_teacher, check_same_vocabulary
from mopd.objectives import Objective, build_objective
from mopd.rollout.base import RolloutEngine
from mopd.rollout.factory import build_engine
from mopd.tasks.base import Task
from mopd.training.checkpoint import TrainerState, load_trainer_state
from mopd.training.distributed import Distributed
from mopd.training.lockstep import Lockstep
from mopd.training.step import StepParts


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


def build_student(
    config: Config, *, device: torch.device, resume_from: Path | None, shard_over: int = 1
) -> tuple[Any, Any, str]:
    """(student, tokenizer, path of the weights the engine serves).

    `shard_over` > 1: FSDP-shard the student over that many processes (`models.sharding`).
    """
    cfg = config.model
    source = str(resume_from / "student") if resume_from else cfg.name
    # With adapters the frozen base always comes from model.name (checkpoints hold the
    # adapter for resuming, and the merged model for users only at the end of training).
    weights = cfg.name if cfg.lora.r else source
    tokenizer = load_tokenizer(weights, cache_dir=cfg.cache_dir)
    student = load_model(weights, dtype=cfg.dtype, cache_dir=cfg.cache_dir)
    if shard_over > 1:  # this process keeps 1/W of every weight, on its device
        shard_model(student, init_device_mesh(device.type, (shard_over,)))
    else:  # Module.to directly: transformers' typed wrapper of `.to` rejects a torch.device
        torch.nn.Module.to(student, device)
    if cfg.lora.r:
        student = add_lora(
            student,
            r=cfg.lora.r,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            seed=derive_seed(config.train.seed, "lora"),
            adapter_dir=resume_from / "adapter" if resume_from else None,
        )
    apply_memory_options(
        base_model(student),
        gradient_checkpointing=cfg.gradient_checkpointing,
        autocast=cfg.autocast,
    )
    return student, tokenizer, resolve_model_path(weights, cfg.cache_dir)


def build_teachers(
    config: Config, objective: Objective, student: Any, tokenizer: Any
) -> tuple[Teacher | None, Teacher | None]:
    """(distillation teacher, frozen reference), each only if the objective needs it."""
    cfg = config.teacher
    teacher = reference = None
    if objective.needs_teacher:
        external = None
        if cfg.kind == "external":
            assert cfg.external_model is not None
            cache = config.model.cache_dir
            external = load_model(cfg.external_model, dtype=config.model.dtype, cache_dir=cache)
            external_tok = load_tokenizer(cfg.external_model, cache_dir=cache, chat=False)
            check_same_vocabulary(tokenizer, external_tok, student, external)
        teacher = build_teacher(
            cfg.kind,
            student,
            rate=cfg.ema_rate,
            mix=cfg.trust_region_mix,
            external_model=external,
        )
    if objective.needs_reference:
        reference = build_teacher("ema", student, rate=0.0)
    return teacher, reference


def build_optimizer(
    config: Config, student: Any
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable weights (LoRA: the adapters) with linear warm-up."""
    cfg = config.optim
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=cfg.betas,
    )
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0
    )
    return optimizer, scheduler


def build_run(
    config: Config,
    task: Task,
    *,
    dist: Distributed,
    device: torch.device,
    shards: int,
    resume_from: Path | None,
) -> tuple[StepParts, TrainerState]:
    """Everything a run's steps use, and its position, restored from `resume_from` if given."""
    sharded = config.train.parallel == "fsdp" and dist.world_size > 1
    objective = build_objective(config)
    student, tokenizer, weights = build_student(
        config, device=device, resume_from=resume_from, shard_over=dist.world_size if sharded else 1
    )
    teacher, reference = build_teachers(config, objective, student, tokenizer)
    optimizer, scheduler = build_optimizer(config, student)
    engine: RolloutEngine = build_engine(
        config.rollout,
        student=student,
        tokenizer=tokenizer,
        model_path=weights,
        world_size=dist.world_size,
        seed=config.train.seed,
        packed_weights=config.model.packed_weights,
    )
    state = TrainerState(step=0, data_position=0, rollout_shards=shards)
    if resume_from is not None:
        state = load_trainer_state(
            resume_from,
            optimizer=optimizer,
            scheduler=scheduler,
            teacher=teacher,
            reference=reference,
            student=student,
        )
        if state.rollout_shards != shards:
            raise ConfigError(
                f"{resume_from} was trained with {state.rollout_shards} rollout shards per "
                f"step, this run would use {shards}: resume with {state.rollout_shards} "
                f"processes, or set train.rollout_shards={state.rollout_shards}"
            )
    if sharded:  # sharded forwards are collectives: keep processes in step
        models = {"student": student}
        for name, scorer in (("teacher", teacher), ("reference", reference)):
            model = getattr(scorer, "model", None)  # an external teacher: not sharded
            if model is not None and is_sharded(model):
                models[name] = model
        dist = replace(dist, lockstep=Lockstep(models, device=dist.device))
    parts = StepParts(
        config, objective, student, tokenizer, engine, task, optimizer, scheduler,
        teacher, reference, dist,
    )  # fmt: skip
    return parts, state
