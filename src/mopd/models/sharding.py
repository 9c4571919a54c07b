"""Fully sharded models (PyTorch FSDP2, ``fully_shard``): layout, copies and full weights.

:func:`shard_model` shards every decoder layer and then the root (embeddings, final norm
and output layer) across a 1-D device mesh of all processes. Each process then keeps
1/W of every parameter, of its gradient and (the optimizer being built over the sharded
parameters) of the AdamW state; a forward all-gathers one layer at a time and frees it
again, a backward reduce-scatters each layer's gradient.

Gradients are *summed* over processes, not averaged (FSDP's default): the training loss
of each process is already its share of the whole step's loss (the denominators are
summed over processes first), exactly as in the replicated mode, whose all-reduce also
sums. Collectives use plain SUM (``set_force_sum_reduction_for_comms``), which gloo
supports and which lets NCCL skip the pre-multiplied sum.

:func:`sharded_copy` is how a teacher is copied from a sharded student (``deepcopy`` of
an FSDP module is not supported): a model of the same class built on the meta device,
sharded with the same mesh and layout, and filled with the student's local shards. Both
models then hold the same slice of every tensor on every process, so an elementwise
update such as the EMA ``θ_T ← θ_T + rate·(θ_S - θ_T)`` runs on the local shards
(:func:`local`) without any communication.

Full weights for checkpoints come from :func:`full_state_dict` (a collective: every
process calls it; rank 0 receives the tensors on CPU, the others an empty dict) and go
back with :func:`load_full_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from transformers import PreTrainedModel


def is_sharded(model: Any) -> bool:
    """True when `model` was sharded by :func:`shard_model` (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded (DTensor) parameter; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered (unsharded) parameter of `model` and register the shards again.

    FSDP keeps the root's parameters gathered after a forward (they are needed again
    soon), and while they are, ``model.parameters()`` yields the gathered tensors, which
    hold no gradient and do not see updates of the shards. Call this before anything
    reads or writes the parameters outside a forward: clipping, the EMA update, state
    dicts. No communication.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of a class in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder-layer class (_no_split_modules): "
            "train.parallel=fsdp needs a Hugging Face causal LM with decoder layers"
        )
    return layers


def shard_model(model: PreTrainedModel, mesh: DeviceMesh) -> PreTrainedModel:
    """Shard each decoder layer, then the root, over `mesh`; in place (also returned).

    Parameters and buffers move to the mesh's device. ``generate`` then keeps the
    processes in step (``synced_gpus``): every process runs a forward until all are done.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # transformers' marker for FSDP2 models: generate(synced_gpus=True) by default.
    object.__setattr__(model, "_is_fsdp_managed_module", True)
    return model


def plain_class(model: torch.nn.Module) -> type[torch.nn.Module]:
    """The model's own class (``fully_shard`` swaps in an ``FSDP<Class>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        return next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


@torch.no_grad()
def sharded_copy(model: PreTrainedModel) -> PreTrainedModel:
    """An independent sharded copy of a sharded model (same class, mesh, layout, values).

    Collective-free: each process copies its own shards. bf16 autocast hooks of the
    original (``model.autocast``) are installed on the copy too.
    """
    from torch.distributed.tensor import DTensor

    from mopd.models.loading import autocast_device, autocast_hooks

    reshard(model)
    first = next(model.parameters())
    assert isinstance(first, DTensor), "sharded_copy needs a model sharded by shard_model"
    mesh = first.device_mesh
    with torch.device("meta"):
        copy: Any = plain_class(model)(model.config)
    copy = copy.to(first.dtype)
    shard_model(copy, mesh)
    copy.to_empty(device=first.device)
    ours = dict(copy.named_parameters())
    theirs = dict(model.named_parameters())
    if ours.keys() != theirs.keys():
        raise ValueError("sharded copy: parameter names differ from the original's")
    for name, param in ours.items():
        local(param).copy_(local(theirs[name]))
    buffers = dict(model.named_buffers())
    for name, buffer in copy.named_buffers():
        buffer.copy_(buffers[name])
    device_type = autocast_device(model)
    if device_type is not None:
        autocast_hooks(copy, device_type)
    return copy.train(model.training)  # type: ignore[no-any-return]


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every tensor of `model`'s state dict in full on CPU on rank 0; `{}` on the others.

    Collective: every process must call it, in the same order as the others.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)  # type: ignore[return-value]


def load_full_state_dict(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a full state dict (as :func:`full_state_dict` wrote it) into a sharded model;
    every process passes the whole dict and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    reshard(model)
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """The optimizer state of a sharded model, in full, keyed by parameter name (rank 0;
    `{}` elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Any
) -> None:
    """Restore what :func:`full_optimizer_state` returned; every process passes it all."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    reshard(model)
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


def save_full_pretrained(model: PreTrainedModel, state: Mapping[str, Tensor], path: Path) -> None:
    """Write `state` (full weights) as a plain Hugging Face folder for `model`'s class.

    Tied parameters (input and output embeddings) are written once, under their first
    name, as ``save_pretrained`` does for a plain model. ``save_pretrained`` records the
    class name in ``config.json``; a sharded model's is ``FSDP<Class>``, which plain
    transformers cannot load, so the plain name is written.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied = {name for group in names.values() for name in group[1:]}
    state = {k: v for k, v in state.items() if k not in tied}
    model.save_pretrained(path, state_dict=state, safe_serialization=True)
    model.config.architectures = [plain_class(model).__name__]
    model.config.save_pretrained(path)
