"""Atomic checkpoints: everything needed to continue a run exactly.

Layout of ``RUN_DIR/checkpoints/step-000010/``::

    student/            Hugging Face folder (save_pretrained): loadable by plain transformers
                        (a LoRA student is saved merged, W + s·B·A, at the end of training
                        and on Ctrl-C only; a 1.5B merged copy is 3.3 GiB per save)
    adapter/            LoRA students only: the PEFT adapter, what resuming loads
    teacher.pt          teacher state (EMA weights, or the frozen initial copy)
    reference.pt        frozen reference policy (DPO), when present
    trainer_state.pt    optimizer, scheduler, RNG states, step, data position, rollout shards
    COMPLETE            written last

A sharded student (``train.parallel=fsdp``) is checkpointed in the same layout with full
tensors: every process takes part in gathering the student, teacher and optimizer state
to rank 0, which writes them. The optimizer state is then keyed by parameter name
(``torch.distributed.checkpoint``'s full optimizer state dict) rather than by position,
and marked so; resuming loads the full state on every process, which keeps its shards.
Such a checkpoint resumes with any process count, but only with ``train.parallel=fsdp``.

A checkpoint is written into a hidden temporary folder and renamed into place, and the
``latest`` pointer is replaced atomically afterwards, so a run killed mid-save leaves
the previous checkpoint intact and never a half-written one that looks finished. Pruning
removes an old checkpoint's COMPLETE marker before its files, so an interrupted prune
leaves a folder that is not trusted either; :func:`clean_checkpoints` removes both kinds
of leftovers when a training starts.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mopd.config import ConfigError
from mopd.models.lora import is_adapted, save_adapted_student
from mopd.models.sharding import (
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state,
    save_full_pretrained,
)

COMPLETE = "COMPLETE"
BY_NAME = "by-name"  # optimizer state format of sharded students


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    data_position: int  # prompts consumed from the training stream
    rollout_shards: int = 1  # sampling layout of each step (collect.shards)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(
    run_dir: Path,
    *,
    state: TrainerState,
    student: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    teacher: Any | None = None,
    reference: Any | None = None,
    keep_last: int = 1,
    write: bool = True,
    merged: bool = True,
) -> Path | None:
    """Write a checkpoint atomically and point ``latest`` at it; prune older ones.

    `merged=False` leaves out a LoRA student's merged ``student/`` folder (resuming needs
    the adapter only); other students always write theirs.

    Sharded student: every process must call this (the states are gathered to rank 0);
    only the one with ``write=True`` (rank 0) writes, the others return None.
    """
    sharded = is_sharded(student)
    if sharded:  # collectives first, on every process, in the same order
        student_state = full_state_dict(student)
        optimizer_state = full_optimizer_state(student, optimizer)
    teacher_state = teacher.state_dict() if teacher is not None else None
    reference_state = reference.state_dict() if reference is not None else None
    if not write:
        return None
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if sharded:
        save_full_pretrained(student, student_state, tmp / "student")
    elif is_adapted(student):  # merged model for users, adapter alone for resuming
        save_adapted_student(student, tmp / "student" if merged else None, tmp / "adapter")
    else:
        student.save_pretrained(tmp / "student", safe_serialization=True)
    tokenizer.save_pretrained(tmp / ("student" if (tmp / "student").exists() else "adapter"))
    if teacher_state is not None:
        torch.save(teacher_state, tmp / "teacher.pt")
    if reference_state is not None:
        torch.save(reference_state, tmp / "reference.pt")
    torch.save(
        {
            "step": state.step,
            "data_position": state.data_position,
            "rollout_shards": state.rollout_shards,
            "optimizer": optimizer_state if sharded else optimizer.state_dict(),
            **({"optimizer_format": BY_NAME} if sharded else {}),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        },
        tmp / "trainer_state.pt",
    )
    _usual_modes(tmp)
    (tmp / COMPLETE).write_text(str(state.step))
    if final.exists():  # re-saving the same step (e.g. final == periodic)
        _remove(final)
    os.replace(tmp, final)
    pointer_tmp = run_dir / "checkpoints" / ".latest.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, run_dir / "checkpoints" / "latest")
    _prune(run_dir, keep_last)
    return final


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide and not thread-safe


def _usual_modes(folder: Path) -> None:
    """Give every file the mode a plain open() would: the weights' writer uses a private
    temporary file (0600), which would keep a shared run's model from its other readers."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~_UMASK)


def is_complete(ckpt: Path) -> bool:
    """Finished writing and not being pruned: the marker and the trainer state are there."""
    return (ckpt / COMPLETE).exists() and (ckpt / "trainer_state.pt").exists()


def _remove(ckpt: Path) -> None:
    (ckpt / COMPLETE).unlink(missing_ok=True)  # first: a half-removed folder is not trusted
    shutil.rmtree(ckpt, ignore_errors=True)


def _prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints, and the newest one holding a
    model (`student/`): a LoRA run's periodic checkpoints hold only the adapter, and the
    model users load must not go before the next one is written."""
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if is_complete(p))
    keep = set(done[-keep_last:]) if keep_last > 0 else set(done)
    with_model = [p for p in done if (p / "student").is_dir()]
    keep.update(with_model[-1:])
    for old in done:
        if old not in keep:
            _remove(old)


def clean_checkpoints(run_dir: Path) -> list[Path]:
    """Remove what a killed save or prune left behind (hidden temporary folders, step
    folders that are not complete); returns the removed paths. Call it only while no
    other process writes to the run (the trainer holds the run lock)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    leftovers = [p for p in root.glob(".tmp-*") if p.is_dir()]
    leftovers += [p for p in root.glob("step-*") if p.is_dir() and not is_complete(p)]
    for path in leftovers:
        _remove(path)
    (root / ".latest.tmp").unlink(missing_ok=True)
    return sorted(leftovers)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    done = sorted(p for p in root.glob("step-*") if is_complete(p))
    return done[-1] if done else None


def load_trainer_state(
    ckpt: Path,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    teacher: Any | None = None,
    reference: Any | None = None,
    student: Any | None = None,
) -> TrainerState:
    """Restore optimizer, scheduler, teacher and RNG states in place; return the counters.

    `student` is needed for a sharded student (its optimizer state is keyed by name).
    """
    data = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    by_name = data.get("optimizer_format") == BY_NAME
    sharded = student is not None and is_sharded(student)
    if by_name and not sharded:
        raise ConfigError(
            f"{ckpt} holds the optimizer state of a sharded student: resume it with "
            "train.parallel=fsdp and several processes"
        )
    if sharded and not by_name:
        raise ConfigError(
            f"{ckpt} holds the optimizer state of an unsharded student (written with "
            "train.parallel=replicate or by a single process): resume it the same way, "
            "not with train.parallel=fsdp"
        )
    if student is not None and sharded:
        load_full_optimizer_state(student, optimizer, data["optimizer"])
    else:
        optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    if teacher is not None:
        teacher.load_state_dict(
            torch.load(ckpt / "teacher.pt", map_location="cpu", weights_only=False)
        )
    if reference is not None:
        reference.load_state_dict(
            torch.load(ckpt / "reference.pt", map_location="cpu", weights_only=False)
        )
    set_rng_state(data["rng"])
    return TrainerState(
        step=data["step"],
        data_position=data["data_position"],
        rollout_shards=data.get("rollout_shards", 1),  # older checkpoints: one process
    )
