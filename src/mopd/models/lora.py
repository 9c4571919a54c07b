"""Low-rank adapters (LoRA, through PEFT) and what an EMA teacher of an adapted student is.

With LoRA the student's effective weight of an adapted linear layer is

    W_eff = W + s·B·A,   s = alpha / r,   A: (r, in), B: (out, r), W frozen,

and only ``A`` and ``B`` are trained. The self-teacher must follow the student's
*effective* weights, ``W_T ← (1 - rate)·W_T + rate·W_eff``. Averaging ``A`` and ``B``
separately is a different model: the EMA of a product is not the product of EMAs
(``ema(B)·ema(A) ≠ ema(B·A)``), so that shortcut would give a teacher that was never
a weighted average of student iterates.

Construction used here: the teacher is a plain full-weight model (no adapters), created
from a merged copy of the student, and :func:`effective_parameters` yields the student's
effective weights one tensor at a time (``W + s·B·A`` computed on the fly per layer,
without merging the student in place) for the teacher's lerp. The peak extra memory of an
update is one layer's weight, not a second model.

Checkpoints of an adapted student (:func:`save_adapted_student`) hold the adapter alone
(``adapter/``, a PEFT folder) and, at the end of training or on Ctrl-C, the merged model
(a plain Hugging Face folder that loads without PEFT, for evaluation and serving). Resuming reloads the frozen base from
``model.name`` and the trained adapter from the checkpoint, which restores the student
bit for bit; the base therefore must not change between the run and its resumption.

PEFT is an optional dependency (``pip install 'mopd[lora]'``), imported only here and
only when adapters are used.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mopd.errors import UnusableModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BASE_LAYER = ".base_layer"  # PEFT's name for the wrapped frozen layer


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "model.lora.r > 0 needs PEFT: pip install 'mopd[lora]' (peft>=0.13,<1)"
        ) from err
    return peft


def is_adapted(model: Any) -> bool:
    """True when `model` is a PEFT model (checked without importing PEFT)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: Any) -> PreTrainedModel:
    """The Hugging Face model inside a PEFT wrapper, or `model` itself."""
    return model.get_base_model() if is_adapted(model) else model  # type: ignore[no-any-return]


def add_lora(
    model: PreTrainedModel,
    *,
    r: int,
    alpha: float,
    target_modules: Sequence[str],
    dropout: float = 0.0,
    seed: int = 0,
    adapter_dir: str | Path | None = None,
) -> Any:
    """Wrap `model` with trainable LoRA adapters; every base weight is frozen.

    New adapters start at ``B = 0`` (the student equals the base model) and a random
    ``A`` drawn from `seed` alone, not from the global RNG. With `adapter_dir`, the
    trained adapter saved there is loaded instead (resume).
    """
    peft = _peft()
    with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return _wrap(peft, model, r, alpha, dropout, target_modules, seed, adapter_dir)


def _wrap(
    peft: Any,
    model: PreTrainedModel,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    seed: int,
    adapter_dir: str | Path | None,
) -> Any:
    if adapter_dir is not None:
        return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # A's init: from `seed`, global RNG untouched
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def _lora_delta(module: Any, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``W + Σ_active s·B·A`` of one PEFT LoRA layer, in `dtype` (default: `weight`'s),
    as a fresh tensor. In float32 the sum keeps changes below a bf16 weight's resolution."""
    out = weight.detach().to(dtype or weight.dtype, copy=True)
    for adapter in module.active_adapters:
        if adapter in module.lora_A and not module.merged:
            out += module.get_delta_weight(adapter).to(out.dtype)
    return out


def computes_plain_lora(module: Any) -> bool:
    """Whether `module` is a PEFT LoRA layer computing ``W·x + Σ s·B·A·x`` right now:
    not merged, not disabled, no variant such as DoRA, no bias on B (``lora_bias``), no
    active dropout, an adapter on, no autocast. Checked without importing PEFT; cheap
    enough to ask on every forward."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or not hasattr(module, "lora_B") or not hasattr(module, "get_base_layer"):
        return False
    if module.merged or module.disable_adapters or getattr(module, "lora_variant", None):
        return False
    if torch.is_autocast_enabled("cpu"):  # would run the float32 parts in bf16
        return False
    names = [a for a in module.active_adapters if a in lora_a]
    if any(module.lora_B[a].bias is not None for a in names):
        return False
    dropping = module.training and any(getattr(module.lora_dropout[a], "p", 0.0) > 0 for a in names)
    return bool(names) and not dropping


def lora_factors(module: Any) -> tuple[Tensor, Tensor] | None:
    """``(A, s·B)`` of a LoRA layer that :func:`computes_plain_lora`: the active adapters'
    factors stacked along the rank (``A``: R×in, ``s·B``: out×R, float32, detached), so
    that the layer computes ``W·x + (s·B)·(A·x)``; None for any other module."""
    if not computes_plain_lora(module):
        return None
    names = [a for a in module.active_adapters if a in module.lora_A]
    a = torch.cat([module.lora_A[n].weight.detach().float() for n in names])
    sb = torch.cat(
        [module.lora_B[n].weight.detach().float() * module.scaling[n] for n in names], dim=1
    )
    return a, sb


def effective_parameters(
    model: Any, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """``(name, weight)`` of the model the student computes, named as in a plain model.

    For a PEFT model, adapted layers give ``W + s·B·A`` (a new tensor per layer, built
    when the iterator reaches it, in `dtype` when given) under the base layer's plain
    name; other parameters are yielded detached. A plain model yields its detached
    parameters. Tied parameters are yielded once, under their first name, like
    ``named_parameters``.
    """
    if not is_adapted(model):
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    from peft.tuners.lora import LoraLayer

    seen: set[int] = set()

    def walk(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
        if isinstance(module, LoraLayer):
            base: torch.nn.Module = module.get_base_layer()  # type: ignore[operator]
            for pname, param in base.named_parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    value = (
                        _lora_delta(module, param, dtype) if pname == "weight" else param.detach()
                    )
                    yield prefix + pname, value
            return
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield prefix + pname, param.detach()
        for cname, child in module.named_children():
            yield from walk(child, f"{prefix}{cname}.")

    yield from walk(base_model(model), "")


def adapter_state(model: Any) -> tuple[Any, dict[str, Tensor]]:
    """The active adapter of a PEFT model as it is saved: its `LoraConfig` and its tensors
    under PEFT's file names (``...q_proj.lora_A.weight``), detached, in their trained
    dtype; what a saved ``adapter/`` folder holds, without writing one."""
    peft = _peft()
    name = model.active_adapter
    # No full embedding matrices: the adapters never resize the vocabulary, and "auto"
    # would look the base model's config up again (on the Hub, for a Hub id) every call.
    state = peft.get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return model.peft_config[name], {key: value.detach() for key, value in state.items()}


def plain_buffers(model: Any) -> Iterator[tuple[str, Tensor]]:
    """The student's buffers under plain-model names (PEFT's ``.base_layer`` removed)."""
    for name, buffer in base_model(model).named_buffers():
        yield name.replace(BASE_LAYER + ".", "."), buffer


ADAPTER_CONFIG = "adapter_config.json"  # what marks a folder as a saved adapter


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` is a saved PEFT adapter folder (a checkpoint's ``adapter/``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapted(adapter_dir: str | Path, base: Any) -> Any:
    """The student a LoRA checkpoint holds: `base` (a loaded plain model, frozen) with the
    adapter of `adapter_dir` on top, in eval mode. Unlike the merged copy, which rounds
    ``W + s·B·A`` to the weights' dtype, this computes what training computed."""
    peft = _peft()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def adapter_base_name(adapter_dir: str | Path) -> str:
    """The base model an adapter was saved on top of (PEFT's ``base_model_name_or_path``)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        name = json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UnusableModelError(f"{path} is not a readable adapter config: {err}") from err
    if not name:
        raise UnusableModelError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model")
    return str(name)


def merged_copy(model: Any) -> PreTrainedModel:
    """A plain full-weight copy of the student's effective model; `model` is untouched."""
    if not is_adapted(model):
        return copy.deepcopy(model)  # type: ignore[no-any-return]
    return copy.deepcopy(model).merge_and_unload()  # type: ignore[no-any-return]


def save_adapted_student(model: Any, student_dir: Path | None, adapter_dir: Path) -> None:
    """Write the adapter to `adapter_dir` and, unless `student_dir` is None, the merged
    model there (a plain HF folder).

    The merged weights are streamed from :func:`effective_parameters` into a state dict
    instead of merging the live student, which keeps training state untouched.
    """
    model.save_pretrained(adapter_dir)
    if student_dir is None:
        return
    merged = {name: value.contiguous() for name, value in effective_parameters(model)}
    merged.update(
        {name: buf for name, buf in plain_buffers(model) if name in _persistent_buffers(model)}
    )
    base_model(model).save_pretrained(student_dir, state_dict=merged, safe_serialization=True)


def _persistent_buffers(model: Any) -> set[str]:
    """Plain names of buffers that belong in a state dict (not ``persistent=False``)."""
    params = {
        name.replace(BASE_LAYER + ".", ".") for name, _ in base_model(model).named_parameters()
    }
    keys = {k.replace(BASE_LAYER + ".", ".") for k in base_model(model).state_dict()}
    return keys - params
