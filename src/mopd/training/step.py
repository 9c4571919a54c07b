"""One training step, in phases that return values (method.md section 1).

    collect    prompts -> G rollouts each -> verifier -> peer contexts -> teacher prompts
    assemble   rows with rewards and group advantages; the objective's normalisers
    objective  per micro-batch: ONE student forward, the objective's loss, backward
    update     gradients summed over processes, clip, optimizer step, teacher follows
    metrics    counts summed over processes, then ratios (`training.metrics`)

The step returns `(StepOutput, metrics)`; it writes nothing and logs nothing. The
objective's normalisers are summed over the whole step (all processes) before the first
micro-batch, so gradient accumulation gives exactly the gradient of the full-batch loss.

Several processes (`training.distributed`) each take whole rollout shards of the step's
prompts (`collect.shards`); gradients are summed before clipping, so every process takes
the step a single process would take on the whole batch. The returned `StepOutput`
holds this process's groups only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mopd.collect.contexts import TeacherInput
from mopd.collect.shards import ShardSamples, sample_local_shards
from mopd.config import Config
from mopd.core.token_loss import engine_agreement
from mopd.models.fused_lora import fused_lora_training
from mopd.models.packing import packed_linears
from mopd.models.teachers import Teacher
from mopd.objectives import Objective, Scorers, StepBatch, StepLog, StudentForward, assemble_batch
from mopd.rollout.base import RolloutEngine
from mopd.tasks.base import Task
from mopd.training.distributed import Distributed
from mopd.training.memory import release_freed_memory
from mopd.training.metrics import step_counts, step_metrics
from mopd.types import Problem, Rollout, Verdict


@dataclass
class StepParts:
    """The long-lived objects of a run that a step uses (built by `training.build`)."""

    config: Config
    objective: Objective
    student: Any  # transformers PreTrainedModel
    tokenizer: Any
    engine: RolloutEngine
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher: Teacher | None  # distillation teacher
    reference: Teacher | None  # frozen initial policy (DPO)
    dist: Distributed


@dataclass
class StepOutput:
    """What the trainer may want to save for inspection."""

    problems: list[Problem]
    groups: list[list[Rollout]]
    verdicts: list[list[Verdict]]
    teacher_inputs: list[list[TeacherInput]] | None
    # Mean per-token teacher log-prob of each rollout; None where no teacher scored it.
    teacher_scores: list[list[float | None]] | None = None


def run_objective(
    objective: Objective,
    batch: StepBatch,
    norms: Mapping[str, float],
    scorers: Scorers,
    *,
    temperature: float,
    is_clip: float | None,
) -> StepLog:
    """Forward, loss and backward of every micro-batch; gradients accumulate in the student.

    Each forward is also compared with the engine's sampling log-probs (at the rollout
    `temperature`): the off-policyness that truncated importance weights correct.
    """
    log = StepLog(losses=dict.fromkeys(objective.terms(norms), 0.0))
    names = [*objective.reports, "rollout/logprob_mismatch"]
    names += ["rollout/is_clipped_fraction"] if is_clip is not None else []
    log.ratios = {name: [0.0, 0.0] for name in names}  # the same keys on every process
    for rows in objective.micro_batches(batch, norms):
        forward = StudentForward.run(rows, scorers, objective.teacher_requests(rows))
        loss = objective.loss(forward, norms, scorers, log)
        agreement = engine_agreement(
            forward.sampling_logprobs(temperature),
            forward.old_logprobs(),
            forward.mask_BR,
            is_clip,
        )
        tokens = agreement["mismatch_tokens"]
        log.add_ratio("rollout/logprob_mismatch", agreement["mismatch_abs"], tokens)
        if is_clip is not None:
            log.add_ratio("rollout/is_clipped_fraction", agreement["is_clipped"], tokens)
        loss.backward()
        log.total += float(loss.detach())
        del forward, loss
        release_freed_memory()  # this micro-batch's activations (training.memory)
    return log


def update(
    student: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    teacher: Teacher | None,
    dist: Distributed,
    *,
    grad_clip: float,
) -> tuple[float, float]:
    """Sum gradients over processes, clip, step; the teacher follows. -> (grad norm, lr)

    A non-finite gradient norm skips the optimizer step and the teacher update (the
    weights stay as they were; the learning-rate schedule still advances): one bad batch
    must not turn the weights into NaN.
    """
    dist.sum_gradients(student.parameters())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip))
    lr = optimizer.param_groups[0]["lr"]
    if math.isfinite(grad_norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    student.eval()
    if teacher is not None and math.isfinite(grad_norm):
        teacher.update(student)
    return grad_norm, float(lr)


def _output(sampled: ShardSamples, batch: StepBatch, log: StepLog) -> StepOutput:
    scores = None
    if sampled.teacher_inputs is not None:
        scores = [[log.teacher_scores.get((r.group, r.index)) for r in g] for g in batch.groups]
    return StepOutput(
        sampled.problems, sampled.groups, sampled.verdicts, sampled.teacher_inputs, scores
    )


def train_step(
    parts: StepParts, problems: Sequence[Problem], *, seed: int
) -> tuple[StepOutput, dict[str, float]]:
    """Sample, score and update once with the configured objective.

    `problems` are the whole step's prompts; this process samples its own shards of them.
    """
    cfg, dist, objective, student = parts.config, parts.dist, parts.objective, parts.student
    t_start = time.perf_counter()
    # 1-4. Collect: G rollouts per prompt, verified, with teacher inputs when distilling.
    sampled = sample_local_shards(
        cfg, parts.engine, parts.tokenizer, parts.task, problems, seed=seed, rank=dist.rank,
        world_size=dist.world_size, teacher_inputs=objective.needs_teacher,
        contrast=objective.needs_contrast,
    )  # fmt: skip
    # Assemble: rows, advantages, and the objective's normalisers over all processes.
    threshold = cfg.peers.success_threshold
    batch = assemble_batch(
        sampled.prompt_ids, sampled.groups, sampled.verdicts, sampled.teacher_inputs,
        success_threshold=threshold, normalize_std=cfg.loss.normalize_std,
    )  # fmt: skip
    norms = dist.sum(objective.normalisers(batch))
    # 5-6. Objective: forwards, per-token losses, masked aggregation, backward.
    t0 = time.perf_counter()
    student.train()
    parts.optimizer.zero_grad(set_to_none=True)
    scorers = Scorers(student, parts.tokenizer.pad_token_id, parts.teacher, parts.reference)
    fixed = [s.model for s in (parts.teacher, parts.reference) if s is not None]
    with (
        packed_linears(*fixed, enabled=cfg.model.packed_weights),  # they change in `update`
        fused_lora_training(student, enabled=cfg.model.packed_weights),
    ):
        log = run_objective(
            objective, batch, norms, scorers, temperature=cfg.rollout.temperature,
            is_clip=cfg.loss.is_clip,
        )  # fmt: skip
    t1 = time.perf_counter()
    # 7. Update, then engines holding their own weights (vLLM) sample from the new ones.
    grad_norm, lr = update(
        student, parts.optimizer, parts.scheduler, parts.teacher, dist,
        grad_clip=cfg.optim.grad_clip,
    )  # fmt: skip
    t2 = time.perf_counter()
    parts.engine.update_weights(student)
    times = {
        "generate": sampled.generate_s, "verify": sampled.verify_s, "context": sampled.context_s,
        "teacher": scorers.seconds, "student": t1 - t0 - scorers.seconds, "optimizer": t2 - t1,
        "weight_push": time.perf_counter() - t2, "step": time.perf_counter() - t_start,
    }  # fmt: skip
    # Metrics: this process's counts, summed over processes, then the ratios.
    inputs = sampled.teacher_inputs
    counts = step_counts(batch, log, inputs, sampled.context_sums, success_threshold=threshold)
    metrics = step_metrics(dist.sum(counts), dist.max(times), grad_norm=grad_norm, lr=lr)
    output = _output(sampled, batch, log)
    del sampled, batch, log, scorers
    release_freed_memory()  # or the heap's holes add up over steps (training.memory)
    return output, metrics
