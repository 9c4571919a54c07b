"""Pre-packed bf16 weights for no-grad passes on CPU.

`torch.nn.functional.linear` on a bf16 CPU tensor hands oneDNN a plain row-major weight,
which oneDNN reorders into its blocked (AMX) layout on every call: one more pass over
every weight per forward. :func:`packed_linears` reorders each large bf16 `nn.Linear`
weight once and runs the module on the packed copy for the duration of a block in which
the weights cannot change: one `generate` call, one step's teacher passes. On a 1.5B
HumanEval step this took the teacher's forwards from 28 to 17 s (docs/benchmarks.md).

Results are those of a bf16 product, not always bit for bit the plain call's: oneDNN
may block a long sequence's product differently, which changes the rounding (on the
1.5B model, a 600-token forward's logits differ by 0.03 on average, a 16-token one's
not at all). The packed copies live only inside the block: they double the packed
layers' weight memory while it runs.

A LoRA layer (PEFT) runs as one packed product too, ``[x, u_hi, u_lo, u_hi]·[W, B_hi, B_hi,
B_lo]ᵀ`` with ``u = A·x`` computed in float32 and ``u`` and ``s·B`` each split into two
bf16 parts: the update is added inside the product's float32 sum with about float32
precision, where PEFT's own path rounds ``W·x`` to bf16, then adds ``s·B·A·x`` over
float32 copies of the layer's whole output (measured on the 1.5B model with 16 rows of
250 tokens: those copies took a prefill from 7.3 s to 17.2 s; fused, it takes 9.0 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mopd.models.fused_lora import split_bf16
from mopd.models.lora import computes_plain_lora, lora_factors

__all__ = ["packed_linears", "packing_available"]

# Smaller weights (LoRA adapters, tiny test models) gain nothing worth a reorder.
MIN_PACKED_ELEMENTS = 1 << 20


def packing_available() -> bool:
    """Whether this torch build can pack bf16 linear weights for oneDNN on this CPU."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and bool(ops._is_mkldnn_bf16_supported())
    )


def _packable(module: nn.Linear, min_elements: int) -> bool:
    weight = module.weight
    return (
        type(module) is nn.Linear  # subclasses may change forward
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.numel() >= min_elements
        and (module.bias is None or module.bias.dtype == torch.bfloat16)
        and not _is_packed(module.__dict__.get("forward"))  # nested blocks
    )


def _is_packed(forward: Any) -> bool:
    return hasattr(forward, "packed_weight")


def _fusable_lora(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The LoRA factors of a layer whose base is a bf16 CPU `nn.Linear` that no outer
    block has packed, else None."""
    if _is_packed(module.__dict__.get("forward")):  # nested blocks
        return None
    factors = lora_factors(module)
    base = module.get_base_layer() if factors is not None else None  # type: ignore[operator]
    if type(base) is not nn.Linear or not _packable(base, 0):
        return None
    return factors


def _fused_lora_forward(
    module: nn.Module, plain: Any, factors: tuple[Tensor, Tensor], min_elements: int
) -> Any:
    """`module`'s LoRA forward as one product on ``[W, s·B]`` (module docstring); `plain`
    under autograd, for other dtypes and devices, and once the adapters change state."""
    base: nn.Linear = module.get_base_layer()  # type: ignore[operator]
    a, sb = factors
    b_hi, b_lo = split_bf16(sb)
    weight = torch.cat([base.weight.detach(), b_hi, b_hi, b_lo], dim=1).contiguous()
    out_features, large = weight.shape[0], base.weight.numel() >= min_elements
    # Only the packed copy stays referenced: the plain one is freed when it is packed.
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if large else weight
    del weight
    bias = None if base.bias is None else base.bias.detach()
    adapters = list(module.active_adapters)  # type: ignore[arg-type]

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if (
            args
            or kwargs
            or torch.is_grad_enabled()
            or x.dtype != torch.bfloat16
            or x.device.type != "cpu"
            or list(module.active_adapters) != adapters  # type: ignore[arg-type]
            or not computes_plain_lora(module)
        ):
            return plain(x, *args, **kwargs)  # type: ignore[no-any-return]
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        u_hi, u_lo = split_bf16(torch.nn.functional.linear(rows.float(), a))
        wide = torch.cat([rows, u_hi, u_lo, u_hi], dim=1)
        if large:
            y = torch.ops.mkldnn._linear_pointwise(wide, packed, bias, "none", [], "")
        else:
            y = torch.nn.functional.linear(wide, packed, bias)
        return y.reshape(*x.shape[:-1], out_features)

    forward.packed_weight = packed  # type: ignore[attr-defined]
    forward.fused_base = base  # type: ignore[attr-defined]
    return forward


def _packed_forward(module: nn.Linear, plain: Any) -> Any:
    """`module`'s forward on a packed copy of its current weight; `plain` under autograd."""
    weight = module.weight.detach()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    bias = None if module.bias is None else module.bias.detach()
    out_features = weight.shape[0]

    def forward(x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return plain(x)  # the packed op has no backward
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], out_features)

    forward.packed_weight = packed  # type: ignore[attr-defined]  # marks a packed module
    return forward


@contextmanager
def packed_linears(
    *models: nn.Module | None,
    enabled: bool = True,
    min_elements: int | None = None,
    fuse_lora: bool = True,
) -> Iterator[int]:
    """Run the `models`' large bf16 CPU linear layers on packed weights inside the block,
    and their bf16 LoRA layers as one product each (module docstring).

    Yields how many layers were packed or fused (0 where packing is off, unavailable or nothing
    qualifies: the block then runs unchanged). The weights must not change inside the
    block; calls with gradients enabled take the plain path. Each module's own forward
    is put back on exit, also on error. A block inside another packs nothing twice, and
    a module shared by two models is packed once; absent (None) models are skipped.
    `min_elements`: the smallest weight packed (default `MIN_PACKED_ELEMENTS`).
    `fuse_lora=False` leaves LoRA layers to PEFT (their base layers are packed).
    """
    if not enabled or not packing_available():
        yield 0
        return
    if min_elements is None:
        min_elements = MIN_PACKED_ELEMENTS
    patched: list[tuple[nn.Module, Any]] = []
    try:
        modules = (m for model in models if model is not None for m in model.modules())
        fused: set[int] = set()  # base layers a fused LoRA layer computes (never called)
        for module in modules:  # a parent comes before its children
            own = module.__dict__.get("forward")  # an instance-level forward, if any
            outer_base = getattr(own, "fused_base", None)
            if outer_base is not None:  # fused by an outer block: so is its base
                fused.add(id(outer_base))
                continue
            factors = _fusable_lora(module) if fuse_lora else None
            if factors is not None:
                forward = _fused_lora_forward(module, module.forward, factors, min_elements)
                fused.add(id(module.get_base_layer()))  # type: ignore[operator]
            elif (
                isinstance(module, nn.Linear)
                and id(module) not in fused
                and _packable(module, min_elements)
            ):
                forward = _packed_forward(module, module.forward)
            else:
                continue
            module.forward = forward  # type: ignore[method-assign]
            patched.append((module, own))
        yield len(patched)
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own  # type: ignore[method-assign]
