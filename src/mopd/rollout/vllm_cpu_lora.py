"""A one-adapter fast path for vLLM's CPU LoRA operations.

On CPU vLLM applies LoRA through the PyTorch ops in ``vllm.lora.ops.torch_ops``: for every
token they gather that token's adapter weights (``weights[indices]``, a copy of an
``(out, r)`` or ``(r, in)`` matrix per token) and multiply with a batched ``einsum``. The
rollout engine serves exactly one adapter, so every token has the same index and the
gather only copies the same matrix once per token: on the 1.5B code batch the served
engine sampled 3.2× slower than with merged weights. When all indices name one adapter,
the ops below compute the same products as one matrix multiplication with that adapter's
weights; any other case (several adapters, tokens without one) goes to vLLM's own op.

`install()` replaces the three ``bgmv`` ops in vLLM's torch-ops module (whose ``sgmv`` ops
call them) and in the CPU Punica wrapper that imported them. It is a no-op where either
module or op is missing (another vLLM version): the engine then runs vLLM's ops, slower
but the same.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["install"]

logger = logging.getLogger(__name__)

MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.punica_wrapper.punica_cpu")
_originals: dict[str, Callable[..., Any]] = {}


def _one_adapter(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
    """The single adapter's 2-D weight when every token's index names the same loaded
    adapter; None otherwise (an index of -1 marks a token without one)."""
    if indices.numel() == 0:
        return None
    first = int(indices[0])
    if first < 0 or not bool(torch.all(indices == first)):
        return None
    weight = weights[first]
    return weight.squeeze(0) if weight.dim() == 3 else weight


def _product(inputs: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return inputs.to(dtype) @ weight.to(dtype).T


def bgmv_shrink(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    indices: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    weight = _one_adapter(weights, indices)
    if weight is None:
        _originals["bgmv_shrink"](inputs, weights, output, indices, scaling)
        return
    result = _product(inputs, weight, output.dtype)
    output[:, : result.shape[1]] = scaling * result


def bgmv_expand(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    indices: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    weight = _one_adapter(weights, indices)
    if weight is None or output.shape[0] != inputs.shape[0]:
        _originals["bgmv_expand"](inputs, weights, output, indices, add_inputs)
        return
    result = _product(inputs, weight, output.dtype)
    width = min(result.shape[1], output.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output[:, :width] += result[:, :width]
    else:
        output[:, :width] = result[:, :width]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    indices: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    weight = _one_adapter(weights, indices)
    if weight is None:
        _originals["bgmv_expand_slice"](
            inputs, weights, output, indices, slice_offset, slice_size, add_inputs
        )
        return
    result = _product(inputs, weight, output.dtype)
    if add_inputs:
        output[:, slice_offset : slice_offset + slice_size] += result
    else:
        output[:, slice_offset : slice_offset + slice_size] = result


FAST = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def install() -> bool:
    """Route vLLM's CPU LoRA ops through the fast path; True when installed (now or before)."""
    if _originals:
        return True
    try:
        modules = [importlib.import_module(name) for name in MODULES]
        found = all(hasattr(module, name) for module in modules for name in FAST)
    except ImportError:
        found = False
    if not found:
        logger.info("vLLM's CPU LoRA ops are not where expected; using them unchanged")
        return False
    _originals.update({name: getattr(modules[0], name) for name in FAST})
    for module in modules:
        for name, op in FAST.items():
            setattr(module, name, op)
    return True
