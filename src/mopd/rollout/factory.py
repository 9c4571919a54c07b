"""Build the rollout engine that `rollout.engine` names, around the student."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from mopd.rollout.base import RolloutEngine

if TYPE_CHECKING:
    from mopd.config import RolloutConfig

__all__ = ["build_engine", "rounds_merged_updates"]

ROUNDED_PUSH = (
    "rollout.engine=vllm with rollout.vllm_lora=false and a {dtype} LoRA student: vLLM "
    "receives the merged weights W + s·B·A in {dtype}, which round updates below a weight's "
    "rounding step away, so it samples from behind the student (see "
    "rollout/logprob_mismatch); rollout.vllm_lora=true serves the adapter itself"
)


def rounds_merged_updates(student: Any) -> bool:
    """Whether a copy of `student`'s effective weights loses small updates: LoRA adapters
    on 16-bit base weights (a merged weight is stored at 8 or 11 significant bits)."""
    from mopd.models.lora import is_adapted

    if not is_adapted(student):
        return False
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in student.modules() if isinstance(m, LoraLayer))
    return layer.get_base_layer().weight.dtype in (torch.bfloat16, torch.float16)


def build_engine(
    config: RolloutConfig,
    *,
    student: Any,
    tokenizer: Any,
    model_path: str,
    world_size: int = 1,
    seed: int = 0,
    packed_weights: bool = True,
) -> RolloutEngine:
    """The engine of `config.engine`, sampling from `student`'s current weights.

    Args:
        config: the `rollout` section.
        student: the training model (a PEFT wrapper with LoRA); the hf engine samples from
            it directly, the vLLM engine gets its adapter (`config.vllm_lora`) or a copy of
            its effective weights.
        tokenizer: the student's tokenizer.
        model_path: the Hugging Face folder (or Hub id) the student's weights came from;
            vLLM builds its model and tokenizer from it.
        world_size: training processes. With several, every process builds its own
            colocated vLLM engine inside the job's process group (vLLM's
            ``external_launcher`` executor, tensor parallel size 1) and samples its own
            rollout shards; all processes must call this at the same point.
        seed: the run seed (vLLM's own default seed; every request carries its own).
        packed_weights: the hf engine samples from packed bf16 CPU weights
            (:mod:`mopd.models.packing`).
    """
    from mopd.config import ConfigError

    if config.engine == "hf":
        from mopd.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(
            student, tokenizer, batch_size=config.batch_size, packed_weights=packed_weights
        )
    if config.engine != "vllm":
        raise ConfigError(f"rollout.engine: got {config.engine!r}, expected 'hf' or 'vllm'")
    from mopd.models.lora import is_adapted

    dtype = next(p.dtype for p in student.parameters())
    serve_adapter = config.vllm_lora and is_adapted(student)
    if not serve_adapter and rounds_merged_updates(student):
        warnings.warn(ROUNDED_PUSH.format(dtype=str(dtype).removeprefix("torch.")), stacklevel=2)
    from mopd.rollout.vllm import DTYPE_NAMES, VLLMRolloutEngine

    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"rollout.engine=vllm: unsupported student dtype {dtype}")
    engine = VLLMRolloutEngine(
        model_path,
        tokenizer,
        dtype=DTYPE_NAMES[dtype],
        memory_fraction=config.vllm_memory_fraction,
        enforce_eager=config.vllm_enforce_eager,
        max_model_len=config.vllm_max_model_len,
        seed=seed,
        external_launcher=world_size > 1,
        lora_rank=_adapter_rank(student) if serve_adapter else None,
    )
    # The folder holds the base weights; a resumed LoRA student (or any student changed
    # since it was loaded) differs, so the engine starts from the student itself. A sharded
    # student's weights are gathered for it, collectively, on every process.
    engine.update_weights(student)
    return engine


def _adapter_rank(student: Any) -> int:
    """The rank vLLM must hold for `student`'s active adapter (its largest, with PEFT's
    per-module ranks)."""
    config = student.peft_config[student.active_adapter]
    return max([int(config.r), *(int(r) for r in (config.rank_pattern or {}).values())])
