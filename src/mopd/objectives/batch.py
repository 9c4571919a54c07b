"""What an objective trains on: the step's rows, the student's forward, the other scorers.

* :class:`Row`: one rollout flattened out of its group, with its reward, success, group
  advantage and (when the objective distils) the teacher's input.
* :class:`StepBatch`: this process's rows of a step, built once by :func:`assemble_batch`.
* :class:`StudentForward`: one student forward (with gradients) over a micro-batch of
  rows; every loss term of the micro-batch reads these logits, so a mixed objective never
  runs the student twice.
* :class:`Scorers`: the teacher and the frozen reference, scored on demand, with the time
  spent in them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from mopd.collect.contexts import TeacherInput
from mopd.core.baselines import group_advantages
from mopd.core.losses import token_logprobs
from mopd.core.token_loss import tempered
from mopd.models.scoring import ScoringBatch, build_scoring_batch, response_logits
from mopd.models.teachers import Teacher
from mopd.types import Rollout, Verdict

TeacherRequest = tuple[int, tuple[int, ...]]  # (row index in its micro-batch, prompt ids)


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

    @property
    def has_context(self) -> bool:
        """Whether the teacher sees peers (or, without contexts, the question) for this row."""
        return self.teacher is not None and self.teacher.has_context

    @property
    def tokens(self) -> int:
        return len(self.rollout.response_ids)


@dataclass(frozen=True)
class StepBatch:
    """This process's rollouts of one step, group after group."""

    rows: tuple[Row, ...]
    n_groups: int

    @cached_property
    def groups(self) -> list[list[Row]]:
        """Rows by group: ``groups[g]`` is group g's rows in order."""
        out: list[list[Row]] = [[] for _ in range(self.n_groups)]
        for row in self.rows:
            out[row.group].append(row)
        return out

    @property
    def with_context(self) -> list[Row]:
        """Rows the teacher scores with a context (the only ones that get a distill loss)."""
        return [r for r in self.rows if r.has_context]


def assemble_batch(
    prompt_ids: Sequence[tuple[int, ...]],
    groups: Sequence[Sequence[Rollout]],
    verdicts: Sequence[Sequence[Verdict]],
    teacher_inputs: Sequence[Sequence[TeacherInput]] | None,
    *,
    success_threshold: float,
    normalize_std: bool,
) -> StepBatch:
    """Rows with rewards, successes and group advantages (``r - mean``, optionally / std)."""
    rewards_PG = [[v.reward for v in vs] for vs in verdicts]
    advantages_PG = group_advantages(
        torch.tensor(rewards_PG, dtype=torch.float64), normalize_std=normalize_std
    ).tolist()
    rows = tuple(
        Row(
            group=gi,
            index=ri,
            prompt_ids=prompt_ids[gi],
            rollout=rollout,
            reward=rewards_PG[gi][ri],
            success=rewards_PG[gi][ri] >= success_threshold,
            teacher=teacher_inputs[gi][ri] if teacher_inputs is not None else None,
            advantage=advantages_PG[gi][ri],
        )
        for gi, group in enumerate(groups)
        for ri, rollout in enumerate(group)
    )
    return StepBatch(rows, len(groups))


@dataclass
class StudentForward:
    """The student's logits over a micro-batch's prompt + response, with gradients, and
    the teacher's logits for the rows `teacher_index` (scored before the student)."""

    rows: Sequence[Row]
    batch: ScoringBatch  # on the student's device
    logits_BRV: Tensor  # at temperature 1
    teacher_index: list[int] = field(default_factory=list)  # the row of each teacher request
    teacher_BRV: Tensor | None = None  # (len(teacher_index), R, V), no grad
    _logprobs: dict[float, Tensor] = field(default_factory=dict)  # with grad
    _sampling: dict[float, Tensor] = field(default_factory=dict)  # without

    @classmethod
    def run(
        cls, rows: Sequence[Row], scorers: Scorers, teacher_requests: Sequence[TeacherRequest] = ()
    ) -> StudentForward:
        """Teacher forwards of `teacher_requests` (if any), then the student's forward.

        Request j asks for the teacher's logits on row ``teacher_index[j]``'s response
        after its own prompt ids; all requests go through one batched teacher call. The
        order is fixed (no-grad forwards first, then the forward whose backward follows
        at once), so that processes with sharded models can keep their forwards and
        backwards in step (`training.lockstep`).
        """
        index = [i for i, _ in teacher_requests]
        width = max(r.tokens for r in rows)
        teacher_BRV = (
            scorers.teacher_logits(
                [(prompt, rows[i].rollout.response_ids) for i, prompt in teacher_requests],
                width=width,
            )
            if index
            else None
        )
        student = scorers.student
        batch = build_scoring_batch(
            [r.prompt_ids for r in rows], [r.rollout.response_ids for r in rows], scorers.pad_id
        ).to(student.device)
        return cls(rows, batch, response_logits(student, batch), index, teacher_BRV)

    @property
    def mask_BR(self) -> Tensor:
        """1.0 on response tokens, 0.0 on padding, in the loss dtype (that of `logprobs`:
        float32, or float64 for float64 logits), without computing any log-probs."""
        dtype = torch.promote_types(self.logits_BRV.dtype, torch.float32)
        return self.batch.response_mask.to(dtype)

    def logprobs(self, temperature: float = 1.0) -> Tensor:
        """Log-probs of the response tokens under ``softmax(logits / T)``.  # (B, R), grad"""
        if temperature not in self._logprobs:
            logits_BRV = tempered(self.logits_BRV, temperature)
            self._logprobs[temperature] = token_logprobs(logits_BRV, self.batch.response_ids)
        return self._logprobs[temperature]

    def sampling_logprobs(self, temperature: float) -> Tensor:
        """:meth:`logprobs` without gradient (reused when already computed with it)."""
        if temperature in self._logprobs:
            return self._logprobs[temperature].detach()
        if temperature not in self._sampling:
            with torch.no_grad():
                logits_BRV = tempered(self.logits_BRV.detach(), temperature)
                self._sampling[temperature] = token_logprobs(logits_BRV, self.batch.response_ids)
        return self._sampling[temperature]

    def old_logprobs(self) -> Tensor:
        """The engine's sampling log-probs, zero-padded like the responses.  # (B, R)"""
        old_BR = torch.zeros(len(self.rows), self.batch.response_width)
        for i, row in enumerate(self.rows):
            lp = row.rollout.logprobs
            old_BR[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        return old_BR.to(self.logits_BRV.device)


# The teacher forward of a micro-batch runs in this many parts of rows sorted by length:
# teacher prompts differ in length by whole peer responses, and each part is padded only
# to its own longest row. Measured in docs/benchmarks.md (systems benchmark).
TEACHER_PARTS = 4


@dataclass
class Scorers:
    """The no-grad models an objective may read besides the student's own forward."""

    student: Any  # a trust-region teacher mixes in the current student
    pad_id: int
    teacher: Teacher | None = None  # distillation teacher
    reference: Teacher | None = None  # frozen initial policy (DPO)
    seconds: float = 0.0  # spent in teacher and reference forwards

    def teacher_logits(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, width: int
    ) -> Tensor:
        """Teacher logits at the responses of (prompt ids, response ids) `pairs`: ``(N, R, V)``
        with R = `width` (at least the longest response).

        Pairs are sorted by prompt + response length and scored in `TEACHER_PARTS`
        forwards; positions past a pair's part width hold zeros (they are masked).
        """
        if self.teacher is None:
            raise RuntimeError("this objective needs a teacher, but none was built")
        t0 = time.perf_counter()
        lengths = [len(prompt) + len(response) for prompt, response in pairs]
        order = sorted(range(len(pairs)), key=lengths.__getitem__)
        part_size = -(-len(pairs) // TEACHER_PARTS)
        out_BRV: Tensor | None = None
        for start in range(0, len(order), part_size):
            part = order[start : start + part_size]
            batch = build_scoring_batch(
                [pairs[i][0] for i in part], [pairs[i][1] for i in part], self.pad_id
            )
            logits_bRV = self.teacher.logits(batch.to(self.student.device), student=self.student)
            if out_BRV is None:
                out_BRV = logits_bRV.new_zeros(len(pairs), width, logits_bRV.shape[-1])
            out_BRV[part, : logits_bRV.shape[1]] = logits_bRV
        assert out_BRV is not None
        self.seconds += time.perf_counter() - t0
        return out_BRV

    def reference_logits(self, batch: ScoringBatch) -> Tensor:
        """The frozen reference's logits over the same batch as the student.  # (B, R, V)"""
        if self.reference is None:
            raise RuntimeError("this objective needs a reference model, but none was built")
        t0 = time.perf_counter()
        logits_BRV = self.reference.logits(batch, student=self.student)
        self.seconds += time.perf_counter() - t0
        return logits_BRV
