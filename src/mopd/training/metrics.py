"""A step's metrics from its counts: pure functions, no model, no process group.

Every process reports sums and counts (:func:`step_counts`); the step adds them up over
processes and only then takes the ratios (:func:`step_metrics`), so a metric of a
multi-process step is the metric of the whole batch, not a mean of per-process means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mopd.collect.contexts import TeacherInput
from mopd.evaluation.metrics import success_auc
from mopd.objectives.base import StepLog
from mopd.objectives.batch import StepBatch

_COUNT = "#n"  # suffix of a ratio's count, next to its numerator
# Peer-context sums (`collect.contexts.context_sums`) -> metric names.
_CONTEXT_METRICS = {
    "mean_successes": "teacher/successes_shown",
    "mean_failures": "teacher/failures_shown",
    "mean_foreign_successes": "teacher/foreign_successes_shown",
    "feedback_fraction": "teacher/feedback_fraction",
    "mean_blocks": "teacher/blocks_mean",
    "control_shortfall": "teacher/control_shortfall_fraction",
}


def in_group_auc(batch: StepBatch, scores: Mapping[tuple[int, int], float]) -> tuple[float, int]:
    """Sum and count over groups (with both classes scored) of the teacher-score AUC."""
    total, count = 0.0, 0
    for group in batch.groups:
        scored = [r for r in group if (r.group, r.index) in scores]
        auc = success_auc([scores[(r.group, r.index)] for r in scored], [r.reward for r in scored])
        if auc is not None:
            total, count = total + auc, count + 1
    return total, count


def step_counts(
    batch: StepBatch,
    log: StepLog,
    teacher_inputs: Sequence[Sequence[TeacherInput]] | None,
    context_sums: Mapping[str, float],
    *,
    success_threshold: float,
) -> dict[str, float]:
    """This process's sums and counts; every process returns the same keys."""
    rows = batch.rows
    counts: dict[str, float] = {
        "rows": len(rows),
        "groups": batch.n_groups,
        "reward": sum(r.reward for r in rows),
        "success": sum(r.success for r in rows),
        "mixed": sum(
            1 for g in batch.groups if len({r.reward >= success_threshold for r in g}) == 2
        ),
        "tokens": sum(r.tokens for r in rows),
        "truncated": sum(r.rollout.truncated for r in rows),
        "loss/total": log.total,
        **{f"loss/{k}": v for k, v in log.losses.items()},
    }
    for name, (numerator, count) in log.ratios.items():
        counts[name], counts[name + _COUNT] = numerator, count
    if teacher_inputs is not None:
        inputs = [t for group in teacher_inputs for t in group]
        with_ctx = [t for t in inputs if t.has_context]
        counts["inputs"] = len(inputs)
        counts["with_ctx"] = len(with_ctx)
        counts["ctx_prompt_tokens"] = sum(len(t.prompt_ids) for t in with_ctx)
        counts["teacher_truncated"] = sum(t.truncated for t in inputs)
        counts["teacher/success_auc"], counts["teacher/success_auc" + _COUNT] = in_group_auc(
            batch, log.teacher_scores
        )
        counts.update({f"context/{k}": v for k, v in context_sums.items()})
    return counts


def _ratio(numerator: float, count: float, empty: float = math.nan) -> float:
    return numerator / count if count else empty


def step_metrics(
    tot: Mapping[str, float], times: Mapping[str, float], *, grad_norm: float, lr: float
) -> dict[str, float]:
    """Namespaced metrics from the step's counts summed over processes (`step_counts`)."""
    n_rows = tot["rows"]
    metrics: dict[str, float] = {
        "rollout/reward_mean": tot["reward"] / n_rows,
        "rollout/success_rate": tot["success"] / n_rows,
        "rollout/mixed_group_fraction": tot["mixed"] / tot["groups"],
        "rollout/response_tokens_mean": tot["tokens"] / n_rows,
        "rollout/truncated_fraction": tot["truncated"] / n_rows,
        "optim/grad_norm": grad_norm,
        "optim/lr": lr,
        "optim/skipped": float(not math.isfinite(grad_norm)),  # no step on a bad gradient
        "perf/tokens_per_s": tot["tokens"] / max(times["generate"], 1e-9),
    }
    metrics.update({k: v for k, v in tot.items() if k.startswith("loss/")})
    for key in tot:  # ratios: a numerator next to its count
        if key.endswith(_COUNT):
            name = key[: -len(_COUNT)]
            metrics[name] = _ratio(tot[name], tot[key])
    if "inputs" in tot:
        metrics["teacher/context_fraction"] = tot["with_ctx"] / tot["inputs"]
        metrics["teacher/prompt_tokens_mean"] = _ratio(tot["ctx_prompt_tokens"], tot["with_ctx"], 0)
        metrics["teacher/truncated_fraction"] = tot["teacher_truncated"] / tot["inputs"]
        n_ctx = tot.get("context/rollouts", 0.0)
        for key, name in _CONTEXT_METRICS.items():
            if f"context/{key}" in tot:
                metrics[name] = _ratio(tot[f"context/{key}"], n_ctx)
    metrics.update({f"time/{k}": v for k, v in times.items()})
    return metrics
