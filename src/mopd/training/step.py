"""One training step, top to bottom (method.md section 1).

    prompts -> G rollouts each -> verifier -> peer contexts -> teacher prompts
    -> teacher forward (no grad) + student forward -> per-token loss -> masked aggregate
    -> backward (micro-batched) -> grad clip, optimizer step -> teacher EMA update

The step returns `(StepOutput, metrics)`; it writes nothing and logs nothing. Loss
denominators are computed over the whole step before the first micro-batch, so gradient
accumulation gives exactly the gradient of the full-batch loss.

Several processes (`training.distributed`) each take whole rollout shards of the step's
prompts; each shard is sampled and peer-matched with its own seed. Denominators and
metrics are summed over processes and gradients are summed before clipping, so every
process takes the step a single process would take on the whole batch. The returned
`StepOutput` holds this process's groups only.

Rollouts whose teacher context is empty are dropped before any forward pass: they would
contribute zero loss, and they do not count in the denominators either.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mopd.config import Config
from mopd.core.baselines import dpo_loss, group_advantages, grpo_loss, preference_pairs, simpo_loss
from mopd.core.losses import (
    aggregate,
    importance_weights,
    sampled_token_reverse_kl,
    topk_divergence,
)
from mopd.evaluation.metrics import success_auc
from mopd.models.scoring import (
    ScoringBatch,
    build_scoring_batch,
    response_logits,
    response_logprobs,
)
from mopd.models.teachers import Teacher
from mopd.rollout.base import RolloutEngine
from mopd.tasks.base import Task
from mopd.training.contexts import TeacherInput
from mopd.training.distributed import Distributed
from mopd.training.shards import distills, sample_local_shards
from mopd.types import Problem, Rollout, Verdict


@dataclass
class StepModules:
    """The long-lived objects a step works with (built by the trainer)."""

    config: Config
    student: Any  # transformers PreTrainedModel
    tokenizer: Any
    engine: RolloutEngine
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher: Teacher | None = None  # distillation teacher
    reference: Teacher | None = None  # frozen initial policy for DPO
    dist: Distributed = field(default_factory=Distributed)  # single process by default


@dataclass(frozen=True)
class Row:
    """One rollout, flattened out of its group for batching."""

    group: int
    index: int  # position inside its group
    prompt_ids: tuple[int, ...]
    rollout: Rollout
    reward: float
    success: bool
    teacher: TeacherInput | None = None
    advantage: float = 0.0


@dataclass
class StepOutput:
    """What the trainer may want to save for inspection."""

    problems: list[Problem]
    groups: list[list[Rollout]]
    verdicts: list[list[Verdict]]
    teacher_inputs: list[list[TeacherInput]] | None
    # Mean per-token teacher log-prob of each rollout; None where no teacher scored it.
    teacher_scores: list[list[float | None]] | None = None


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _denominator(mode: str, token_counts: Sequence[int]) -> float:
    """This process's share of the normaliser of `aggregate` (summed over processes)."""
    if mode == "token-mean":
        return float(sum(token_counts))
    return float(sum(1 for n in token_counts if n > 0))


def _old_logprobs(rows: Sequence[Row], width: int) -> torch.Tensor:
    old = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        lp = row.rollout.logprobs
        old[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return old


def _engine_agreement(
    sums: dict[str, float],
    logp_BR: torch.Tensor,
    old_BR: torch.Tensor,
    mask_BR: torch.Tensor,
    is_clip: float | None,
) -> None:
    """Adds up how far the engine's sampling log-probs are from the student's recomputation.

    Within a step the student still has the weights that sampled, so any gap is the
    engine's numerics (KV-cached decoding, another kernel library, vLLM's own forward):
    the off-policyness that truncated importance weights correct.
    """
    with torch.no_grad():
        delta_BR = (logp_BR.detach() - old_BR) * mask_BR
        sums["mismatch_abs"] += float(delta_BR.abs().sum())
        sums["mismatch_tokens"] += float(mask_BR.sum())
        if is_clip is not None:
            clipped_BR = (delta_BR > math.log(is_clip)) & (mask_BR > 0)
            sums["is_clipped"] += float(clipped_BR.sum())


# The teacher forward of a micro-batch runs in this many parts of rows sorted by length:
# teacher prompts differ in length by whole peer responses, and each part is padded only
# to its own longest row. Measured in docs/benchmarks.md (systems benchmark).
TEACHER_PARTS = 4


def _teacher_logits(mods: StepModules, chunk: Sequence[Row], device: torch.device) -> torch.Tensor:
    """Teacher logits at the chunk's response positions: ``(B, R, V)``, R its longest response.

    Rows are sorted by teacher prompt + response length and scored in `TEACHER_PARTS`
    forwards; positions past a row's part width hold zeros (they are masked out).
    """
    assert mods.teacher is not None
    pad = mods.tokenizer.pad_token_id
    lengths = [len(r.teacher.prompt_ids) + len(r.rollout.response_ids) for r in chunk]  # type: ignore[union-attr]
    order = sorted(range(len(chunk)), key=lengths.__getitem__)
    width_r = max(len(r.rollout.response_ids) for r in chunk)
    out_BRV: torch.Tensor | None = None
    for part in _chunks(order, math.ceil(len(chunk) / TEACHER_PARTS)):
        batch = build_scoring_batch(
            [chunk[i].teacher.prompt_ids for i in part],  # type: ignore[union-attr]
            [chunk[i].rollout.response_ids for i in part],
            pad,
        )
        logits_bRV = mods.teacher.logits(batch.to(device), student=mods.student)
        if out_BRV is None:
            out_BRV = logits_bRV.new_zeros(len(chunk), width_r, logits_bRV.shape[-1])
        out_BRV[list(part), : logits_bRV.shape[1]] = logits_bRV
    assert out_BRV is not None
    return out_BRV


def _distill_rows(
    mods: StepModules,
    rows: Sequence[Row],
    denom: float,
    stats: dict[str, list[float]],
    scores: dict[tuple[int, int], float],
    times: dict[str, float],
    sums: dict[str, float],
) -> float:
    """Teacher + student forwards and backward for rows with a context; returns the loss."""
    cfg = mods.config
    assert mods.teacher is not None
    pad = mods.tokenizer.pad_token_id
    total = 0.0
    device = next(mods.student.parameters()).device
    for chunk in _chunks(rows, cfg.train.micro_batch_size):
        responses = [r.rollout.response_ids for r in chunk]
        t0 = time.perf_counter()
        t_logits_BRV = _teacher_logits(mods, chunk, device)
        t1 = time.perf_counter()
        s_batch = build_scoring_batch([r.prompt_ids for r in chunk], responses, pad).to(device)
        s_logits_BRV = response_logits(mods.student, s_batch)
        mask_BR = s_batch.response_mask.to(s_logits_BRV.dtype)
        s_logp_BR = response_logprobs(s_logits_BRV, s_batch.response_ids)
        t_logp_BR = response_logprobs(t_logits_BRV, s_batch.response_ids)
        if cfg.loss.estimator == "sampled-token":
            per_tok_BR = sampled_token_reverse_kl(s_logp_BR, t_logp_BR)
        else:
            per_tok_BR = topk_divergence(
                s_logits_BRV,
                t_logits_BRV,
                k=cfg.loss.topk,
                alpha=cfg.loss.alpha,
                add_tail=cfg.loss.add_tail,
            )
        # Rollout log-probs are those of the tempered sampling distribution: compare alike.
        temp = cfg.rollout.temperature
        samp_logp_BR = (
            s_logp_BR
            if temp == 1.0
            else response_logprobs(s_logits_BRV.detach() / temp, s_batch.response_ids)
        )
        old_BR = _old_logprobs(chunk, s_logp_BR.shape[1]).to(device)
        _engine_agreement(sums, samp_logp_BR, old_BR, mask_BR, cfg.loss.is_clip)
        if cfg.loss.is_clip is not None:
            per_tok_BR = per_tok_BR * importance_weights(samp_logp_BR, old_BR, cfg.loss.is_clip)
        loss = aggregate(per_tok_BR, mask_BR, cfg.loss.aggregation, denominator=denom)
        weight = 1.0 - cfg.loss.grpo_mix if cfg.loss.kind == "grpo" else 1.0
        (weight * loss).backward()
        total += float(loss.detach())
        # Per-rollout signal quality: teacher score and teacher-minus-student gap.
        with torch.no_grad():
            n_tok = mask_BR.sum(1).clamp_min(1)
            score_B = (t_logp_BR * mask_BR).sum(1) / n_tok
            gap_B = ((t_logp_BR - s_logp_BR.detach()) * mask_BR).sum(1) / n_tok
        for row, score, gap in zip(chunk, score_B.tolist(), gap_B.tolist(), strict=True):
            stats["score"].append(score)
            scores[(row.group, row.index)] = score
            stats["gap_success" if row.success else "gap_failure"].append(gap)
        t2 = time.perf_counter()
        times["teacher"] += t1 - t0
        times["student"] += t2 - t1
    return total


def _student_forward(
    mods: StepModules, rows: Sequence[Row], *, temperature: float = 1.0
) -> tuple[ScoringBatch, torch.Tensor, torch.Tensor]:
    """Student (with grad) over rows' prompt + response: batch, logp_BR, float mask_BR."""
    device = next(mods.student.parameters()).device
    batch = build_scoring_batch(
        [r.prompt_ids for r in rows],
        [r.rollout.response_ids for r in rows],
        mods.tokenizer.pad_token_id,
    ).to(device)
    logits_BRV = response_logits(mods.student, batch, temperature=temperature)
    logp_BR = response_logprobs(logits_BRV, batch.response_ids)
    return batch, logp_BR, batch.response_mask.to(logp_BR.dtype)


def _grpo_rows(
    mods: StepModules, rows: Sequence[Row], denom: float, sums: dict[str, float]
) -> float:
    """PPO-clip policy gradient over rows with a non-zero advantage (others add zero)."""
    cfg = mods.config
    total = 0.0
    for chunk in _chunks(rows, cfg.train.micro_batch_size):
        # Old log-probs came from the tempered sampling distribution: score the same one.
        _, logp_BR, mask_BR = _student_forward(mods, chunk, temperature=cfg.rollout.temperature)
        old_BR = _old_logprobs(chunk, logp_BR.shape[1]).to(logp_BR.device)
        _engine_agreement(sums, logp_BR, old_BR, mask_BR, None)
        adv_B = torch.tensor(
            [r.advantage for r in chunk], device=logp_BR.device, dtype=logp_BR.dtype
        )
        loss, _ = grpo_loss(
            logp_BR,
            old_BR,
            adv_B,
            mask_BR,
            clip_low=cfg.loss.clip_low,
            clip_high=cfg.loss.clip_high,
            aggregation=cfg.loss.aggregation,
            denominator=denom,
        )
        ((1.0 - cfg.loss.grpo_mix) * loss).backward()
        total += float(loss.detach())
    return total


def _sft_rows(mods: StepModules, rows: Sequence[Row], denom: float) -> float:
    """Token-mean NLL over verified successes (`denom`: their tokens, all processes)."""
    total = 0.0
    for chunk in _chunks(rows, mods.config.train.micro_batch_size):
        _, logp_BR, mask_BR = _student_forward(mods, chunk)
        loss = aggregate(-logp_BR, mask_BR, "token-mean", denominator=denom)
        loss.backward()
        total += float(loss.detach())
    return total


def _preference_groups(
    mods: StepModules,
    groups: Sequence[Sequence[Row]],
    pairs_per_group: Sequence[list[tuple[int, int]]],
    n_pairs: float,
) -> float:
    """On-policy DPO / SimPO: pairs inside each group; one group is one micro-batch.

    `n_pairs` counts the pairs of the whole step, over all processes."""
    cfg = mods.config
    total = 0.0
    for group, pairs in zip(groups, pairs_per_group, strict=True):
        if not pairs:
            continue
        batch, logp_BR, mask_BR = _student_forward(mods, group)
        seq_B = (logp_BR * mask_BR).sum(1)
        if cfg.loss.kind == "dpo":
            assert mods.reference is not None
            ref_logits = mods.reference.logits(batch, student=mods.student)
            ref_B = (response_logprobs(ref_logits, batch.response_ids) * mask_BR).sum(1)
            loss = dpo_loss(seq_B, ref_B, pairs, beta=cfg.loss.beta)
        else:
            avg_B = seq_B / mask_BR.sum(1).clamp_min(1)
            loss = simpo_loss(avg_B, pairs, beta=cfg.loss.simpo_beta, gamma=cfg.loss.simpo_gamma)
        # dpo_loss averages over the group's pairs: reweight to the step's pair mean.
        (loss * len(pairs) / n_pairs).backward()
        total += float(loss.detach()) * len(pairs) / n_pairs
    return total


def _in_group_auc(rows: Sequence[Row], scores: Sequence[float]) -> tuple[float, int]:
    """Sum and count over groups (with both classes scored) of the teacher-score success AUC."""
    by_group: dict[int, tuple[list[float], list[float]]] = {}
    for row, score in zip(rows, scores, strict=True):
        s, r = by_group.setdefault(row.group, ([], []))
        s.append(score)
        r.append(row.reward)
    aucs = [success_auc(s, r) for s, r in by_group.values()]
    defined = [a for a in aucs if a is not None]
    return sum(defined), len(defined)


def _tokens(rows: Sequence[Row]) -> list[int]:
    return [len(r.rollout.response_ids) for r in rows]


def _mean(total: float, count: float, empty: float = math.nan) -> float:
    return total / count if count else empty


def train_step(
    mods: StepModules, problems: Sequence[Problem], *, seed: int
) -> tuple[StepOutput, dict[str, float]]:
    """Sample, score, distill (or run the configured baseline), and update once.

    `problems` are the whole step's prompts; this process samples its own shards of them.
    """
    cfg, dist, student = mods.config, mods.dist, mods.student
    times = {k: 0.0 for k in ("generate", "verify", "context", "teacher", "student", "optimizer")}
    t_start = time.perf_counter()

    # 1-4. G rollouts per prompt from the current student, verified, with teacher contexts.
    sampled = sample_local_shards(
        cfg,
        mods.engine,
        mods.tokenizer,
        mods.task,
        problems,
        seed=seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    times["generate"], times["verify"] = sampled.generate_s, sampled.verify_s
    times["context"] = sampled.context_s
    groups, verdicts, teacher_inputs = sampled.groups, sampled.verdicts, sampled.teacher_inputs
    threshold = cfg.peers.success_threshold
    rewards_PG = [[v.reward for v in vs] for vs in verdicts]
    advantages = group_advantages(
        torch.tensor(rewards_PG, dtype=torch.float64), normalize_std=cfg.loss.normalize_std
    ).tolist()
    rows = [
        Row(
            group=gi,
            index=ri,
            prompt_ids=sampled.prompt_ids[gi],
            rollout=rollout,
            reward=rewards_PG[gi][ri],
            success=rewards_PG[gi][ri] >= threshold,
            teacher=teacher_inputs[gi][ri] if teacher_inputs else None,
            advantage=advantages[gi][ri],
        )
        for gi, group in enumerate(groups)
        for ri, rollout in enumerate(group)
    ]
    ctx_rows = [r for r in rows if r.teacher is not None and r.teacher.has_context]
    successes = [r for r in rows if r.success]
    by_group = [[r for r in rows if r.group == g] for g in range(len(groups))]
    pairs = [preference_pairs([r.reward for r in g]) for g in by_group]
    # Normalisers of the whole step (all processes), fixed before the first micro-batch.
    denoms = dist.sum(
        {
            "ctx_rows": len(ctx_rows),
            "distill": _denominator(cfg.loss.aggregation, _tokens(ctx_rows)),
            "grpo": _denominator(cfg.loss.aggregation, _tokens(rows)),
            "sft": sum(_tokens(successes)),
            "pairs": sum(len(p) for p in pairs),
        }
    )

    # 5-6. Forwards, per-token losses, masked aggregation, backward.
    student.train()
    mods.optimizer.zero_grad(set_to_none=True)
    losses: dict[str, float] = {}
    stats: dict[str, list[float]] = {"score": [], "gap_success": [], "gap_failure": []}
    scores: dict[tuple[int, int], float] = {}
    sums = {"mismatch_abs": 0.0, "mismatch_tokens": 0.0, "is_clipped": 0.0}
    if distills(cfg) and denoms["ctx_rows"]:
        d = denoms["distill"]
        losses["distill"] = (
            _distill_rows(mods, ctx_rows, d, stats, scores, times, sums) if ctx_rows else 0.0
        )
    t0 = time.perf_counter()
    if cfg.loss.kind == "grpo":
        active = [r for r in rows if r.advantage != 0.0]
        losses["grpo"] = _grpo_rows(mods, active, denoms["grpo"], sums) if active else 0.0
    elif cfg.loss.kind == "sft":
        losses["sft"] = _sft_rows(mods, successes, denoms["sft"]) if successes else 0.0
    elif cfg.loss.kind in ("dpo", "simpo"):
        losses[cfg.loss.kind] = _preference_groups(mods, by_group, pairs, denoms["pairs"])
    times["student"] += time.perf_counter() - t0

    # 7. Gradients summed over processes, optimizer step, then the teacher follows.
    t0 = time.perf_counter()
    dist.sum_gradients(student.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
    lr = mods.optimizer.param_groups[0]["lr"]
    mods.optimizer.step()
    mods.scheduler.step()
    mods.optimizer.zero_grad(set_to_none=True)
    student.eval()
    if mods.teacher is not None:
        mods.teacher.update(student)
    times["optimizer"] = time.perf_counter() - t0
    # Engines holding their own copy of the weights (vLLM) sample the next step from these.
    t0 = time.perf_counter()
    mods.engine.update_weights(student)
    times["weight_push"] = time.perf_counter() - t0
    times["step"] = time.perf_counter() - t_start

    # Metrics: sums and counts over all processes, then the ratios.
    local = {
        "rows": len(rows),
        "groups": len(groups),
        "reward": sum(r.reward for r in rows),
        "success": sum(r.success for r in rows),
        "mixed": sum(1 for rs in rewards_PG if len({x >= threshold for x in rs}) == 2),
        "tokens": sum(_tokens(rows)),
        "truncated": sum(r.rollout.truncated for r in rows),
        **sums,
        **{f"loss/{k}": v for k, v in losses.items()},
    }
    if teacher_inputs is not None:
        inputs = [t for group in teacher_inputs for t in group]
        with_ctx = [t for t in inputs if t.has_context]
        local["inputs"] = len(inputs)
        local["with_ctx"] = len(with_ctx)
        local["ctx_prompt_tokens"] = sum(len(t.prompt_ids) for t in with_ctx)
        local["teacher_truncated"] = sum(t.truncated for t in inputs)
        local["auc"], local["auc_groups"] = _in_group_auc(ctx_rows, stats["score"])
        for kind in ("success", "failure"):
            local[f"gap_{kind}"] = sum(stats[f"gap_{kind}"])
            local[f"gap_{kind}_n"] = len(stats[f"gap_{kind}"])
    tot, times = dist.sum(local), dist.max(times)
    n_rows = tot["rows"]
    metrics: dict[str, float] = {
        "rollout/reward_mean": tot["reward"] / n_rows,
        "rollout/success_rate": tot["success"] / n_rows,
        "rollout/mixed_group_fraction": tot["mixed"] / tot["groups"],
        "rollout/response_tokens_mean": tot["tokens"] / n_rows,
        "rollout/truncated_fraction": tot["truncated"] / n_rows,
        "loss/total": sum(tot[f"loss/{k}"] for k in losses),
        "optim/grad_norm": float(grad_norm),
        "optim/lr": float(lr),
        "perf/tokens_per_s": tot["tokens"] / max(times["generate"], 1e-9),
    }
    metrics.update({f"loss/{k}": tot[f"loss/{k}"] for k in losses})
    if tot["mismatch_tokens"]:
        # Mean |log p_student - log p_engine| over the sampled tokens that were rescored.
        metrics["rollout/logprob_mismatch"] = tot["mismatch_abs"] / tot["mismatch_tokens"]
        if cfg.loss.is_clip is not None:
            metrics["rollout/is_clipped_fraction"] = tot["is_clipped"] / tot["mismatch_tokens"]
    if teacher_inputs is not None:
        metrics["teacher/context_fraction"] = tot["with_ctx"] / tot["inputs"]
        metrics["teacher/prompt_tokens_mean"] = _mean(
            tot["ctx_prompt_tokens"], tot["with_ctx"], 0.0
        )
        metrics["teacher/truncated_fraction"] = tot["teacher_truncated"] / tot["inputs"]
        metrics["teacher/success_auc"] = _mean(tot["auc"], tot["auc_groups"])
        for kind in ("success", "failure"):
            metrics[f"gap/{kind}"] = _mean(tot[f"gap_{kind}"], tot[f"gap_{kind}_n"])
    metrics.update({f"time/{k}": v for k, v in times.items()})
    teacher_scores = (
        [[scores.get((gi, ri)) for ri in range(len(g))] for gi, g in enumerate(groups)]
        if teacher_inputs is not None
        else None
    )
    output = StepOutput(sampled.problems, groups, verdicts, teacher_inputs, teacher_scores)
    return output, metrics
