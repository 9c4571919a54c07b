"""A bf16 LoRA layer's training forward and backward without float32 copies of its output.

PEFT computes a LoRA layer as ``y = W·x + b`` in the weights' dtype, then adds
``s·B·A·x`` through float32 tensors the size of the layer's output (the ``B`` product,
the scale, the add, which promotes ``y``, and the cast back) after a float32 cast of
``x``, and differentiates through all of them in backward. With a bf16 base on CPU those elementwise passes over thousands of
rows of up to 8,960 columns cost more than the base product's own share: on the 1.5B
model one micro-batch (2 rows of 450 tokens) took 5.4 s forward and backward with
adapters and 3.4 s with the same gradients flowing through frozen weights alone.

:class:`LoraLinear` computes the same function in the same precision: ``A·x`` in float32,
the update added into ``W·x + b`` by one bf16 product whose float32 sum takes ``u = A·x``
and ``s·B`` as two bf16 parts each (:func:`split_bf16`), so the update keeps about 16 bits
of mantissa, as PEFT's float32 add does. Backward computes the adapters' gradients from
a float32 copy of the output's gradient (needed once) and keeps only ``x`` (bf16) and
``u`` for it, where PEFT keeps a float32 copy of ``x``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mopd.models.lora import computes_plain_lora

__all__ = ["LoraLinear", "fused_lora_training", "split_bf16"]


def split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (float32) as ``hi + lo`` in bf16: together about 16 bits of mantissa."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def add_low_rank_(y: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``y += left · rightᵀ`` in place, for bf16 `y` and float32 `left` (N×R) and `right`
    (M×R), with both factors split so that the product keeps about float32 precision."""
    l_hi, l_lo = split_bf16(left)
    r_hi, r_lo = split_bf16(right)
    # (l_hi + l_lo)(r_hi + r_lo) less l_lo·r_lo, which is below float32's resolution.
    return y.addmm_(torch.cat([l_hi, l_lo, l_hi], 1), torch.cat([r_hi, r_hi, r_lo], 1).T)


class LoraLinear(torch.autograd.Function):
    """``W·x + b + s·B·A·x`` for rows `x` (N×in, bf16), frozen `weight` and `bias`, and
    trainable `a` (R×in) and `b_` (out×R) in float32; gradients for `x`, `a` and `b_`."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b_: Tensor, s: float
    ) -> Tensor:
        u = F.linear(x.float(), a)  # (N, R)
        y = add_low_rank_(F.linear(x, weight, bias), u, b_ * s)
        ctx.save_for_backward(x, weight, a, b_, u)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, a, b_, u = ctx.saved_tensors
        s = ctx.s
        grad_y32 = grad_y.float()
        v = grad_y32 @ (b_ * s)  # (N, R): the gradient of u
        grad_a = v.T @ x.float() if ctx.needs_input_grad[3] else None
        grad_b = (grad_y32.T @ u) * s if ctx.needs_input_grad[4] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = add_low_rank_(grad_y @ weight, v, a.T)
        return grad_x, None, None, grad_a, grad_b, None


def _training_forward(module: Any, plain: Any) -> Any:
    """`module`'s forward through :class:`LoraLinear`; `plain` whenever it does not apply."""
    base: nn.Linear = module.get_base_layer()

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        names = [n for n in module.active_adapters if n in module.lora_A]
        if (
            args
            or kwargs
            or len(names) != 1
            or x.dtype != torch.bfloat16
            or x.device.type != "cpu"
            or not computes_plain_lora(module)
        ):
            return plain(x, *args, **kwargs)  # type: ignore[no-any-return]
        name = names[0]
        rows = x.reshape(-1, x.shape[-1])
        y = LoraLinear.apply(
            rows if rows.is_contiguous() else rows.contiguous(),
            base.weight,
            base.bias,
            module.lora_A[name].weight,
            module.lora_B[name].weight,
            float(module.scaling[name]),
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])  # type: ignore[no-any-return]

    forward.fused_lora = True  # type: ignore[attr-defined]
    return forward


def _trainable_bf16_lora(module: Any) -> bool:
    if "forward" in module.__dict__ or not computes_plain_lora(module):
        return False  # already patched (nested blocks, packed) or not a plain LoRA layer
    base = module.get_base_layer()
    factors = [module.lora_A[n].weight for n in module.lora_A] + [
        module.lora_B[n].weight for n in module.lora_B
    ]
    return (
        type(base) is nn.Linear
        and base.weight.dtype == torch.bfloat16
        and base.weight.device.type == "cpu"
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)  # LoraLinear trains A, B only
        and all(f.dtype == torch.float32 for f in factors)
    )


@contextmanager
def fused_lora_training(model: nn.Module | None, *, enabled: bool = True) -> Iterator[int]:
    """Run `model`'s bf16 CPU LoRA layers through :class:`LoraLinear` inside the block.

    Yields how many layers were switched (0: the block runs unchanged). Layers in any
    other state keep PEFT's path: merged, disabled, dropout active, several adapters,
    a bias on B, autocast (checked on every call), float32 weights, bf16 adapters or a
    trainable base bias. Each module's forward is put back on exit.
    """
    patched: list[nn.Module] = []
    try:
        if enabled and model is not None:
            for module in model.modules():
                if _trainable_bf16_lora(module):
                    module.forward = _training_forward(module, module.forward)  # type: ignore[method-assign]
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
