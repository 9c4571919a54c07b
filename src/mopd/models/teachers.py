"""Teachers: where the distillation target distribution comes from.

Every teacher answers one question through :meth:`Teacher.logits`: given a scoring batch
(teacher prompt + the student's response tokens), what are the next-token logits at each
response position? The kinds (method section 5):

- ``ema``: a self-teacher whose weights follow the student,
  ``θ_T ← (1 - rate)·θ_T + rate·θ_S`` after every optimizer step (paper: rate 0.05).
  ``rate = 0`` keeps a frozen copy of the initial student (also the DPO reference).
- ``trust-region``: ``lerp(initial-model logits, current-student logits, mix)``; the
  initial model is a frozen copy taken at construction.
- ``external``: a separate frozen model that must share the student's vocabulary
  (:func:`check_same_vocabulary`).

Teacher logits are computed under ``torch.no_grad`` and never carry gradient; teacher
weights never require grad. :meth:`Teacher.state_dict` holds what a checkpoint needs to
restore the teacher exactly: unlike the reference code, resuming does not silently reset
the EMA teacher to the student.

A LoRA student (:mod:`mopd.models.lora`) gets a plain full-weight teacher built from its
merged weights; the EMA then follows the effective weights ``W + s·B·A`` layer by layer,
never the adapter factors.

A sharded student (``train.parallel=fsdp``, :mod:`mopd.models.sharding`) gets teachers
sharded the same way: the EMA runs on each process's shards, and the state dicts for
checkpoints are full (gathered on rank 0; loading takes the full dict on every process).

Half-precision EMA. A bfloat16 weight cannot hold an average of students: for a
1536×1536 layer (weights ~0.02) and a LoRA-sized change of 1e-4, one bf16
``lerp(θ_T, θ_S, 0.05)`` moves about 6% of the entries by a whole rounding step and leaves
the rest unchanged. A non-sharded EMA teacher in half precision therefore keeps a float32
record of the average for every weight that has moved (`EmaTeacher.exact`); the model
holds its rounding for the forward passes, and the record is checkpointed with it.

Compact checkpoints. Such a teacher's state is its float32 records alone: a recorded
weight is the rounding of its record, and a weight without a record never moved, so it
equals the student's (the EMA follows the student after every optimizer step, and a
resumed run builds its teacher from the restored student before loading the records).
For a 1.5B bf16 student that drops the 3.1 GB bf16 copy from every checkpoint. A frozen
copy (rate 0: the DPO reference) and float32 teachers keep their full state.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from mopd.models.lora import effective_parameters, is_adapted, merged_copy, plain_buffers
from mopd.models.scoring import ScoringBatch, output_vocab_size, response_logits
from mopd.models.sharding import (
    full_state_dict,
    is_sharded,
    load_full_state_dict,
    local,
    reshard,
    sharded_copy,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TEACHER_KINDS = ("ema", "trust-region", "external")
EXACT_PREFIX = "ema_float32."  # checkpoint keys of the float32 EMA record


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    """`model` in eval mode with no parameter requiring or holding a gradient."""
    for param in model.parameters():
        param.requires_grad_(False)
        param.grad = None
    return model.eval()


def _frozen_copy(student: PreTrainedModel) -> PreTrainedModel:
    """A detached plain copy of `student`'s effective model (LoRA merged) on its device;
    of a sharded student, a copy sharded the same way."""
    return _frozen(sharded_copy(student) if is_sharded(student) else merged_copy(student))


@contextlib.contextmanager
def _eval_mode(model: PreTrainedModel) -> Iterator[None]:
    """Temporarily disable dropout, restoring the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_name(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "name_or_path", "") or type(model).__name__)


class Teacher(ABC):
    """Source of teacher logits for the distillation loss."""

    kind: ClassVar[str]
    model: Any = None  # the teacher's own model (a step packs it: models.packing)

    @abstractmethod
    def logits(
        self, batch: ScoringBatch, *, student: PreTrainedModel, temperature: float = 1.0
    ) -> Tensor:
        """Detached teacher logits ``(B, R, V)`` for the response columns of `batch`."""

    def update(self, student: PreTrainedModel) -> None:  # noqa: B027 - default is a no-op
        """Follow the student after an optimizer step (no-op unless the kind says so)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that restore this teacher exactly (live references, like nn.Module)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""


class _CopyTeacher(Teacher):
    """A teacher that owns one frozen model copied from the student at construction."""

    def __init__(self, student: PreTrainedModel) -> None:
        self.model = _frozen_copy(student)

    def state_dict(self) -> dict[str, Tensor]:
        """Live tensors; of a sharded model, full copies on rank 0 (a collective)."""
        if is_sharded(self.model):
            return full_state_dict(self.model)
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if is_sharded(self.model):
            load_full_state_dict(self.model, state)
        else:
            self.model.load_state_dict(state, strict=True)


class EmaTeacher(_CopyTeacher):
    """Self-teacher with exponential-moving-average weights of the student."""

    kind = "ema"

    def __init__(self, student: PreTrainedModel, rate: float = 0.05) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"EMA rate must be in [0, 1], got {rate}")
        super().__init__(student)
        self.rate = rate
        # name -> float32 average, for half-precision weights that have moved (module doc).
        self.exact: dict[str, Tensor] = {}
        self._half = not is_sharded(self.model) and any(
            p.dtype in (torch.bfloat16, torch.float16) for p in self.model.parameters()
        )

    def _lerp_exact(self, name: str, param: Tensor, target: Tensor) -> None:
        """``param ← round(average)`` with the average kept in float32."""
        record = self.exact.get(name)
        if record is None:
            if torch.equal(param.float(), target.float()):
                return  # never moved (e.g. frozen under LoRA): nothing to record
            record = self.exact[name] = param.float()
        record.lerp_(target.float(), self.rate)
        param.copy_(record)

    @property
    def compact(self) -> bool:
        """Whether the state is the float32 records alone (module docstring)."""
        return self._half and self.rate > 0

    def state_dict(self) -> dict[str, Tensor]:
        records = {EXACT_PREFIX + name: t for name, t in self.exact.items()}
        return records if self.compact else {**super().state_dict(), **records}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore a full state, or the records alone onto a teacher just built from the
        restored student (compact state: no plain model keys)."""
        model = {k: v for k, v in state.items() if not k.startswith(EXACT_PREFIX)}
        if model or not self.compact:
            super().load_state_dict(model)
        params = dict(self.model.named_parameters())
        self.exact = {}
        for key, value in state.items():
            if key.startswith(EXACT_PREFIX):
                name = key[len(EXACT_PREFIX) :]
                self.exact[name] = value.float().to(params[name].device)
                params[name].copy_(self.exact[name])

    def logits(
        self, batch: ScoringBatch, *, student: PreTrainedModel, temperature: float = 1.0
    ) -> Tensor:
        with torch.no_grad():
            return response_logits(self.model, batch, temperature=temperature)

    @torch.no_grad()
    def update(self, student: PreTrainedModel) -> None:
        """``θ_T ← θ_T + rate·(θ_S - θ_T)`` for every parameter; buffers are copied.

        For a LoRA student ``θ_S`` is the effective weight ``W + s·B·A`` of each layer.
        Sharded models: teacher and student hold the same slice of every parameter on
        each process, and the update runs on these local shards.
        """
        if self.rate == 0.0:  # frozen copy of the initial student
            return
        for model in (self.model, student):
            if is_sharded(model):
                reshard(model)
        if is_adapted(student):
            self._update_from_effective(student)
            return
        teacher_params = dict(self.model.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            raise ValueError("student parameters no longer match the EMA teacher's copy")
        names = list(teacher_params)
        ours: list[Tensor] = [local(teacher_params[n]) for n in names]
        theirs: list[Tensor] = [local(student_params[n].detach()) for n in names]
        if self._half:
            for name, mine, other in zip(names, ours, theirs, strict=True):
                self._lerp_exact(name, mine, other)
        elif hasattr(torch, "_foreach_lerp_"):
            torch._foreach_lerp_(ours, theirs, self.rate)
        else:  # pragma: no cover - very old torch
            for mine, other in zip(ours, theirs, strict=True):
                mine.lerp_(other, self.rate)
        student_buffers = dict(student.named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(student_buffers[name])

    def _update_from_effective(self, student: PreTrainedModel) -> None:
        """The EMA toward effective weights computed one layer at a time (bounded memory)."""
        teacher_params = dict(self.model.named_parameters())
        done: set[str] = set()
        exact_dtype = torch.float32 if self._half else None  # keep sub-bf16 LoRA changes
        for name, value in effective_parameters(student, dtype=exact_dtype):
            if name not in teacher_params:
                raise ValueError(f"student weight {name!r} has no counterpart in the EMA teacher")
            if self._half:
                self._lerp_exact(name, teacher_params[name], value)
            else:
                teacher_params[name].lerp_(value.to(teacher_params[name].dtype), self.rate)
            done.add(name)
        if done != teacher_params.keys():
            missing = sorted(teacher_params.keys() - done)[:3]
            raise ValueError(f"EMA teacher weights {missing} have no student counterpart")
        teacher_buffers = dict(self.model.named_buffers())
        for name, buffer in plain_buffers(student):
            teacher_buffers[name].copy_(buffer)


class TrustRegionTeacher(_CopyTeacher):
    """Teacher logits interpolated between the initial model and the current student."""

    kind = "trust-region"

    def __init__(self, student: PreTrainedModel, mix: float = 0.5) -> None:
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"trust-region mix must be in [0, 1], got {mix}")
        super().__init__(student)
        self.mix = mix

    def logits(
        self, batch: ScoringBatch, *, student: PreTrainedModel, temperature: float = 1.0
    ) -> Tensor:
        with torch.no_grad():
            if self.mix == 1.0:
                with _eval_mode(student):
                    return response_logits(student, batch, temperature=temperature)
            initial_BRV = response_logits(self.model, batch, temperature=temperature)
            if self.mix == 0.0:
                return initial_BRV
            with _eval_mode(student):
                current_BRV = response_logits(student, batch, temperature=temperature)
            return initial_BRV.lerp_(current_BRV.to(initial_BRV), self.mix)


class ExternalTeacher(Teacher):
    """A separate frozen model sharing the student's vocabulary."""

    kind = "external"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        self.model = _frozen(model)
        self.tokenizer = tokenizer

    def logits(
        self, batch: ScoringBatch, *, student: PreTrainedModel, temperature: float = 1.0
    ) -> Tensor:
        with torch.no_grad():
            logits_BRV = response_logits(self.model, batch, temperature=temperature)
        return logits_BRV.to(student.device)

    def state_dict(self) -> dict[str, Tensor]:
        """Empty: the frozen weights are reloaded from their source, not checkpointed."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(
                f"an external teacher stores no state, got {len(state)} tensors; "
                "was this checkpoint written with another teacher kind?"
            )


def _check_output_sizes(student_model: PreTrainedModel, teacher_model: PreTrainedModel) -> None:
    size_s, size_t = output_vocab_size(student_model), output_vocab_size(teacher_model)
    if size_s != size_t:
        raise ValueError(
            f"student model {_model_name(student_model)!r} predicts {size_s} token ids but "
            f"teacher model {_model_name(teacher_model)!r} predicts {size_t}. Models of one "
            "family can share a tokenizer yet pad their output layer differently (e.g. "
            "151936 vs 152064); the loss compares distributions over the same ids, so pick "
            "a teacher whose output size matches the student's."
        )


def check_same_vocabulary(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_model: PreTrainedModel,
    teacher_model: PreTrainedModel,
) -> None:
    """Raise ValueError unless both tokenizers map the same tokens to the same ids and
    both models have the same output vocabulary size."""
    vocab_s, vocab_t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vocab_s != vocab_t:
        only_s = sorted(set(vocab_s) - set(vocab_t))
        only_t = sorted(set(vocab_t) - set(vocab_s))
        moved = sorted(t for t in set(vocab_s) & set(vocab_t) if vocab_s[t] != vocab_t[t])
        raise ValueError(
            "student and teacher tokenizers differ "
            f"(student {_model_name(student_model)!r}: {len(vocab_s)} tokens, teacher "
            f"{_model_name(teacher_model)!r}: {len(vocab_t)} tokens; only in student: "
            f"{len(only_s)} e.g. {only_s[:3]}, only in teacher: {len(only_t)} e.g. "
            f"{only_t[:3]}, different ids: {len(moved)} e.g. {moved[:3]}). An external "
            "teacher must use the student's tokenizer."
        )
    _check_output_sizes(student_model, teacher_model)


def build_teacher(
    kind: str,
    student: PreTrainedModel,
    *,
    rate: float = 0.05,
    mix: float = 0.5,
    external_model: PreTrainedModel | None = None,
    external_tokenizer: PreTrainedTokenizerBase | None = None,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
) -> Teacher:
    """Build the teacher named `kind` (one of :data:`TEACHER_KINDS`) for `student`.

    ``ema`` uses `rate`, ``trust-region`` uses `mix`, ``external`` needs `external_model`,
    which is moved to the student's device and dtype; its output size is always checked
    against the student's, and the tokenizers too when both are given.
    """
    if kind == "ema":
        return EmaTeacher(student, rate=rate)
    if kind == "trust-region":
        return TrustRegionTeacher(student, mix=mix)
    if kind == "external":
        if external_model is None:
            raise ValueError("teacher kind 'external' needs external_model (a loaded model)")
        if external_tokenizer is not None and student_tokenizer is not None:
            check_same_vocabulary(student_tokenizer, external_tokenizer, student, external_model)
        else:
            _check_output_sizes(student, external_model)
        device, dtype = student.device, student.dtype
        external_model = external_model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
        return ExternalTeacher(external_model, external_tokenizer)
    raise ValueError(f"unknown teacher kind {kind!r}; choose one of {', '.join(TEACHER_KINDS)}")
