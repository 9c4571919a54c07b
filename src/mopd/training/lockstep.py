"""Keep sharded (FSDP) forwards and backwards of processes in step when their counts differ.

With sharded models every forward all-gathers each layer's weights and every backward
reduce-scatters its gradients: all processes must run the same forwards and backwards in
the same order. A training step does not: a process runs one forward and backward per
micro-batch of *its own* rows with a teacher context (possibly none), so the processes'
counts differ from step to step (the replicated mode needs no such agreement: it sums
gradients once, after the last backward).

:class:`Lockstep` makes the processes agree without changing the step. Before every
forward of a sharded model, and before the backward of every forward with gradients,
the processes exchange a small code saying what they are about to run (an all-gather of
one integer). The lowest-ranked process that is still working leads: processes about
to run the same operation run it together; the others *mirror* it (the same module's
forward on a one-token dummy input, or the backward of such a dummy output scaled by
zero, whose gradient contribution is zero) and then announce their own operation again.
A process that finished its backwards calls :meth:`Lockstep.finish`, which mirrors the
others' operations until every process has finished. Every process thus runs the same
sequence of collectives, and the reduce-scattered gradient is the sum of the real
backwards only: the same gradient as the replicated mode.

Mirrored forwards run under the mode (grad or no grad) of the one they mirror, and a
mirrored forward with gradients keeps its dummy output until the leader's backward of
that forward, which is mirrored in first-in first-out order. This assumes what the
training step does: each forward with gradients is followed by its own backward before
the next forward with gradients of that model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.utils._pytree import tree_flatten

from mopd.models.sharding import reshard

FINISHED = 0  # code of a process waiting in `finish`
# Operation codes per model: 3*i + 1 forward without grad, + 2 with grad, + 3 backward.
_NO_GRAD, _GRAD, _BACKWARD = 1, 2, 3


class Lockstep:
    """Forward/backward agreement for sharded `models` (name -> model), see module doc."""

    def __init__(self, models: Mapping[str, torch.nn.Module], *, device: str) -> None:
        self.names = list(models)
        self.models = [models[n] for n in self.names]
        self.device = torch.device(device)
        self.world_size = torch_dist.get_world_size()
        self.mirrored = 0  # mirrored operations since the last `take_mirrored`
        self._mirroring = False
        self._pending: list[torch.Tensor] = []  # dummy outputs awaiting their backward
        for index, model in enumerate(self.models):
            model.register_forward_pre_hook(self._pre_forward_hook(index), prepend=True)
            model.register_forward_hook(self._post_forward_hook(index), prepend=True)

    # ---------------------------------------------------------------- hooks
    def _pre_forward_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if not self._mirroring:
                grad = torch.is_grad_enabled()
                self._agree(3 * index + (_GRAD if grad else _NO_GRAD))

        return hook

    def _post_forward_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self._mirroring or not torch.is_grad_enabled():
                return
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
            tensors = [t for t in tensors if t.requires_grad]
            announced = [False]

            def before_backward(grad: torch.Tensor) -> None:
                # The first of the outputs to receive its gradient announces the backward,
                # before the model's own backward hooks start communicating.
                if not announced[0]:
                    announced[0] = True
                    self._agree(3 * index + _BACKWARD)

            for tensor in tensors:
                tensor.register_hook(before_backward)

        return hook

    def take_mirrored(self) -> int:
        """Dummy passes this process ran since the last call (the cost of imbalance)."""
        count, self.mirrored = self.mirrored, 0
        return count

    # ---------------------------------------------------------------- protocol
    def _gather(self, code: int) -> list[int]:
        mine = torch.tensor([code], dtype=torch.int64, device=self.device)
        codes = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch_dist.all_gather(codes, mine)
        return [int(c.item()) for c in codes]

    def _agree(self, code: int) -> None:
        """Mirror the leader's operations until the leader runs `code` too."""
        while True:
            leader = next(c for c in self._gather(code) if c != FINISHED)
            if leader == code:
                return
            self._mirror(leader)

    def finish(self) -> None:
        """Mirror the other processes' operations until all of them have finished."""
        while True:
            working = [c for c in self._gather(FINISHED) if c != FINISHED]
            if not working:
                break
            self._mirror(working[0])
        if self._pending:
            raise RuntimeError(
                f"{len(self._pending)} mirrored forward(s) with gradients never saw their "
                "backward: a training step ran a forward with gradients and no backward"
            )
        for model in self.models:  # gathered roots hold no gradient (clipping follows)
            reshard(model)

    def _mirror(self, code: int) -> None:
        index, op = divmod(code - 1, 3)
        op += 1
        model = self.models[index]
        self._mirroring = True
        self.mirrored += 1
        try:
            if op == _BACKWARD:
                if not self._pending:
                    raise RuntimeError(
                        f"process out of step: another process runs the backward of "
                        f"{self.names[index]!r} but this one has no forward to mirror it with"
                    )
                # This process may be inside a no-grad forward (a teacher's) when it mirrors.
                with torch.enable_grad():
                    (self._pending.pop(0).float().sum() * 0.0).backward()
                return
            device = next(model.parameters()).device
            dummy = torch.zeros((1, 1), dtype=torch.long, device=device)
            with torch.set_grad_enabled(op == _GRAD):
                logits = model(input_ids=dummy, use_cache=False).logits
            if op == _GRAD:
                self._pending.append(logits)
        finally:
            self._mirroring = False
