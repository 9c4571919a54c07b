"""Data-parallel training across processes with `torch.distributed`.

A launcher (`torchrun`, or `accelerate launch`, which calls it) starts one process per
device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_distributed` reads them and opens the default process group
(gloo on CPU, NCCL on CUDA) unless the caller already did; nothing else of the launcher
is used. By default (``train.parallel=replicate``) every process holds a full copy of the
student, the teacher and the optimizer.

What is split: the P prompts of a step, in whole rollout shards (`collect.shards`), so
a rollout group never straddles two processes and each shard's rollouts do not depend on
which process draws them.

What is reduced, so that W processes take the step one process would take on the whole
batch: the loss denominators (token or sequence counts, summed before the first forward),
the gradients (summed after the last backward, before clipping), and the metrics (sums
and counts, summed; timings, max). Each process then clips the same gradient and takes the
same optimizer and EMA-teacher step, so the replicas stay equal without a broadcast.

With ``train.parallel=fsdp`` the student (and the teachers copied from it) are sharded
instead (`mopd.models.sharding`): FSDP sums each gradient with a reduce-scatter during
the backward, and :meth:`Distributed.sum_gradients` only waits, through
`training.lockstep`, until every process has run its backwards.

Compared with `DistributedDataParallel`, the gradient sum runs once after the whole
accumulation (DDP under `no_sync` would do the same) rather than overlapping the last
backward; in exchange a process whose rollouts carry no loss (no teacher context) can
skip its forwards without leaving the others waiting in a collective inside backward.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as torch_dist

from mopd.config import ConfigError

if TYPE_CHECKING:
    from mopd.training.lockstep import Lockstep

T = TypeVar("T")

# Elements per flattened gradient all-reduce: 64 MB of fp32, like DDP's default buckets
# in size order; bounds the extra memory of the reduction.
GRAD_BUCKET_ELEMENTS = 2**24


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job, and the collectives the trainer needs.

    With ``world_size == 1`` every collective returns its input and touches no process
    group, so single-process training runs no distributed code at all.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective buffers live: "cpu" for gloo, "cuda:i" for NCCL
    owns_group: bool = False  # `close` destroys the process group only if we opened it
    # Sharded models (train.parallel=fsdp): keeps their forwards and backwards in step.
    lockstep: Lockstep | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and shows progress."""
        return self.rank == 0

    def _reduce(self, values: Sequence[float], op: torch_dist.ReduceOp.RedOpType) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        buffer = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(buffer, op=op)
        return [float(v) for v in buffer.tolist()]

    def sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """Element-wise sum over processes; every process must pass the same keys."""
        keys = sorted(values)
        return dict(
            zip(keys, self._reduce([values[k] for k in keys], torch_dist.ReduceOp.SUM), strict=True)
        )

    def max(self, values: Mapping[str, float]) -> dict[str, float]:
        """Element-wise max over processes (timings: the slowest process bounds the step)."""
        keys = sorted(values)
        return dict(
            zip(keys, self._reduce([values[k] for k in keys], torch_dist.ReduceOp.MAX), strict=True)
        )

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over processes.

        A parameter that received no gradient on any process keeps ``grad = None`` (the
        optimizer then skips it, as it would in a single process); one that received a
        gradient elsewhere gets zeros locally before the sum.

        Sharded models: FSDP summed the gradients shard by shard during each backward;
        this waits, mirroring the others' forwards and backwards, until every process
        has finished its own (`training.lockstep`).
        """
        if self.world_size == 1:
            return
        if self.lockstep is not None:
            self.lockstep.finish()
            return
        params = [p for p in parameters if p.requires_grad]
        present = self._reduce([float(p.grad is not None) for p in params], torch_dist.ReduceOp.SUM)
        live = [p for p, n in zip(params, present, strict=True) if n > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in live:
            if bucket and (size + p.numel() > GRAD_BUCKET_ELEMENTS or p.dtype != bucket[0].dtype):
                _all_reduce_grads(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        if bucket:
            _all_reduce_grads(bucket)

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every process (any picklable object)."""
        if self.world_size == 1:
            return obj
        holder: list[object] = [obj]
        torch_dist.broadcast_object_list(holder, src=0, device=torch.device(self.device))
        return holder[0]  # type: ignore[return-value]

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order (any picklable object)."""
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out  # type: ignore[return-value]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        assert g is not None
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without."""
    env = os.environ

    def read(name: str, default: int) -> int:
        value = env.get(name)
        try:
            return default if value is None else int(value)
        except ValueError:
            raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    return rank, world, read("LOCAL_RANK", rank)


def init_distributed(device_type: str, *, timeout_minutes: float) -> Distributed:
    """Join the launcher's process group (or open it: gloo for CPU, NCCL for CUDA).

    Without a launcher (no ``WORLD_SIZE`` > 1 and no existing group) this is a
    single-process :class:`Distributed` and no process group is created.
    """
    owns = False
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
        local = launched_world()[2] if "LOCAL_RANK" in os.environ else rank
    else:
        rank, world, local = launched_world()
        if world == 1:
            return Distributed()
        if not torch_dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if device_type == "cuda":
            if not 0 <= local < torch.cuda.device_count():  # else "invalid device ordinal"
                raise ConfigError(
                    f"process with LOCAL_RANK={local} needs CUDA device {local}, but this "
                    f"machine has {torch.cuda.device_count()}: launch at most that many "
                    "processes per node, or set model.device=cpu"
                )
            torch.cuda.set_device(local)
        torch_dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
            rank=rank,
            world_size=world,
        )
        owns = True
    if world == 1:
        return Distributed(owns_group=owns)
    backend = torch_dist.get_backend()
    device = f"cuda:{local}" if backend == "nccl" else "cpu"
    return Distributed(
        rank=rank, world_size=world, local_rank=local, device=device, owns_group=owns
    )
