"""Build the rollout engine that `rollout.engine` names, around the student."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mopd.rollout.base import RolloutEngine

if TYPE_CHECKING:
    from mopd.config import RolloutConfig

__all__ = ["build_engine"]


def build_engine(
    config: RolloutConfig,
    *,
    student: Any,
    tokenizer: Any,
    model_path: str,
    world_size: int = 1,
    seed: int = 0,
) -> RolloutEngine:
    """The engine of `config.engine`, sampling from `student`'s current weights.

    Args:
        config: the `rollout` section.
        student: the training model (a PEFT wrapper with LoRA); the hf engine samples from
            it directly, the vLLM engine gets a copy of its effective weights.
        tokenizer: the student's tokenizer.
        model_path: the Hugging Face folder (or Hub id) the student's weights came from;
            vLLM builds its model and tokenizer from it.
        world_size: training processes; vLLM supports only one (its engine is colocated
            with the single process that trains).
        seed: the run seed (vLLM's own default seed; every request carries its own).
    """
    from mopd.config import ConfigError

    if config.engine == "hf":
        from mopd.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(student, tokenizer, batch_size=config.batch_size)
    if config.engine != "vllm":
        raise ConfigError(f"rollout.engine: got {config.engine!r}, expected 'hf' or 'vllm'")
    if world_size > 1:
        raise ConfigError(
            f"rollout.engine=vllm runs one colocated vLLM engine inside a single training "
            f"process; this run has {world_size} processes. Launch one process, or use "
            "rollout.engine=hf with several processes"
        )
    from mopd.rollout.vllm import DTYPE_NAMES, VLLMRolloutEngine

    dtype = next(p.dtype for p in student.parameters())
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
    )
    # The folder holds the base weights; a resumed LoRA student (or any student changed
    # since it was loaded) differs, so the engine starts from the student itself.
    engine.update_weights(student)
    return engine
