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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

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
        and not hasattr(module.__dict__.get("forward"), "packed_weight")  # nested blocks
    )


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
    *models: nn.Module | None, enabled: bool = True, min_elements: int | None = None
) -> Iterator[int]:
    """Run the `models`' large bf16 CPU linear layers on packed weights inside the block.

    Yields how many layers were packed (0 where packing is off, unavailable or nothing
    qualifies: the block then runs unchanged). The weights must not change inside the
    block; calls with gradients enabled take the plain path. Each module's own forward
    is put back on exit, also on error. A block inside another packs nothing twice, and
    a module shared by two models is packed once; absent (None) models are skipped.
    `min_elements`: the smallest weight packed (default `MIN_PACKED_ELEMENTS`).
    """
    if not enabled or not packing_available():
        yield 0
        return
    if min_elements is None:
        min_elements = MIN_PACKED_ELEMENTS
    patched: list[tuple[nn.Module, Any]] = []
    try:
        modules = (m for model in models if model is not None for m in model.modules())
        for module in modules:
            if isinstance(module, nn.Linear) and _packable(module, min_elements):
                own = module.__dict__.get("forward")  # an instance-level forward, if any
                module.forward = _packed_forward(module, module.forward)  # type: ignore[method-assign]
                patched.append((module, own))
        yield len(patched)
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own  # type: ignore[method-assign]
