"""Rollout records written during training.

``rollouts.jsonl`` keeps a few groups per step for reading by eye (with the teacher prompt
text); ``rollouts_full.jsonl`` (opt-in) keeps every rollout with its token ids, messages,
peers and teacher score, for ``mopd analyze``, and stops growing at a size cap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mopd.training.step import StepOutput

SAMPLES_FILE = "rollouts.jsonl"
FULL_ROLLOUTS_FILE = "rollouts_full.jsonl"


def rollout_records(
    step: int, output: StepOutput, *, full: bool, max_groups: int | None = None
) -> Iterator[dict[str, Any]]:
    """One JSON-ready record per rollout of the first `max_groups` groups (all if None)."""
    groups = list(zip(output.problems, output.groups, strict=True))[:max_groups]
    for gi, (problem, group) in enumerate(groups):
        for ri, rollout in enumerate(group):
            teacher = output.teacher_inputs[gi][ri] if output.teacher_inputs else None
            verdict = output.verdicts[gi][ri]
            record: dict[str, Any] = {
                "step": step,
                "problem": problem.id,
                "question": problem.question,
                "response": rollout.text,
                "reward": verdict.reward,
                "truncated": rollout.truncated,
                "has_context": teacher.has_context if teacher else None,
                "successes": list(teacher.context.successes) if teacher else None,
                "failures": list(teacher.context.failures) if teacher else None,
            }
            if not full:
                record["teacher_prompt"] = teacher.text if teacher else None
                yield record
                continue
            record.update(
                index=ri,
                messages=[dict(m) for m in problem.messages],
                response_ids=list(rollout.response_ids),
                feedback=verdict.feedback,
                foreign_successes=(
                    [list(p) for p in teacher.context.foreign_successes] if teacher else None
                ),
                teacher_prompt_tokens=len(teacher.prompt_ids) if teacher else None,
                teacher_prompt_truncated=teacher.truncated if teacher else None,
                teacher_score=output.teacher_scores[gi][ri] if output.teacher_scores else None,
            )
            yield record


def append_records(path: Path, records: Iterator[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def append_full_records(path: Path, step: int, output: StepOutput, *, cap_bytes: float) -> bool:
    """Append every rollout of the step unless the file already reached `cap_bytes`.

    Returns False when the cap stopped the write (the caller warns once).
    """
    if path.exists() and path.stat().st_size >= cap_bytes:
        return False
    append_records(path, rollout_records(step, output, full=True))
    return True
