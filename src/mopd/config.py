"""The run configuration: nested dataclasses are the single source of truth.

A configuration is resolved in four layers, later ones winning:

1. dataclass defaults below,
2. the method preset (``method: grpo`` etc., see ``METHOD_PRESETS``),
3. a YAML recipe (``--config FILE.yaml`` or a packaged recipe name such as ``demo``),
4. ``key=value`` overrides from the command line (dotted paths, YAML-typed values).

Every field is range-checked in ``__post_init__`` with a message that names the field, and
unknown keys fail before any model loads, naming the nearest valid keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from mopd.core.fields import field_help, opt, opt_factory
from mopd.core.peers import PeerConfig
from mopd.core.prompts import LAYOUTS, TeacherTemplates

METHODS = ("mopd", "mopd-2s", "mopd-signed", "sdpo", "grpo", "opd", "dpo", "simpo", "sft")
TEACHER_KINDS = ("ema", "trust-region", "external")
PARALLEL_MODES = ("replicate", "fsdp")
ROLLOUT_ENGINES = ("hf", "vllm")


class ConfigError(ValueError):
    """A configuration value or key the user must change."""


def loss_kinds() -> list[str]:
    """The registered training objectives (``loss.kind`` values), see `mopd.objectives`."""
    from mopd.objectives import REGISTRY  # imports torch: only when a config is built

    return sorted(REGISTRY)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {message}")


def _one_of(value: object, name: str, allowed: Sequence[object]) -> None:
    _check(value in allowed, name, f"got {value!r}, expected one of {list(allowed)}")


@dataclass
class LoraSettings:
    """Low-rank adapters (PEFT): ``W + (alpha / r)·B·A`` on `target_modules`; r=0 = off."""

    r: int = opt(0, "adapter rank; 0 trains every weight (no adapters)")
    alpha: float = opt(16.0, "adapter scale numerator: the update is (alpha / r)·B·A")
    dropout: float = opt(0.0, "dropout on the adapter input")
    target_modules: list[str] = opt_factory(
        lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters",
    )

    def __post_init__(self) -> None:
        _check(self.r >= 0, "model.lora.r", f"must be >= 0 (0 = no adapters), got {self.r}")
        _check(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _check(
            0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}"
        )
        _check(
            bool(self.target_modules)
            and all(isinstance(m, str) and m for m in self.target_modules),
            "model.lora.target_modules",
            "must be a non-empty list of module names, e.g. [q_proj, v_proj]",
        )


@dataclass
class ModelConfig:
    name: str = opt(
        "packaged:smollm2-135m-instruct", "student: Hugging Face id, local folder, or packaged:NAME"
    )
    dtype: str = opt("float32", "weights' dtype: float32 or bfloat16")
    cache_dir: str | None = opt(
        None, "where packaged models are converted; null: $MOPD_CACHE or ~/.cache/mopd"
    )
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps")
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = opt(
        False, "recompute activations in backward: less memory, more time"
    )
    autocast: str = opt(
        "none", "bfloat16: forwards in bf16 autocast over fp32 master weights; none: off"
    )
    packed_weights: bool = opt(
        True,
        "bf16 on CPU: rollouts and teacher passes run on weights packed once for oneDNN, "
        "and a LoRA student's layers as fused products in those passes and in training "
        "(faster; bf16 rounding may differ; one more copy of the weights while they run)",
    )

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must not be empty")
        _one_of(self.dtype, "model.dtype", ("float32", "bfloat16"))
        _one_of(self.autocast, "model.autocast", ("none", "bfloat16"))
        _check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "model.device",
            f"got {self.device!r}, expected auto, cpu, cuda, cuda:N or mps",
        )


@dataclass
class TaskConfig:
    name: str = opt(
        "arithmetic",
        "built-in task (arithmetic, math, code, mcq, tool, reasoning_gym) or module:factory",
    )
    options: dict[str, Any] = opt_factory(
        dict, "the task's own options, e.g. task.options.digits=2"
    )

    def __post_init__(self) -> None:
        _check(bool(self.name), "task.name", "must not be empty")
        _check(isinstance(self.options, dict), "task.options", "must be a mapping")


@dataclass
class RolloutConfig:
    engine: str = opt("hf", "hf (transformers generate) or vllm (needs the vllm extra)")
    n: int = opt(8, "G: rollouts per prompt (the group; >= 2)")
    temperature: float = opt(1.0, "sampling temperature of the rollouts")
    top_p: float = opt(1.0, "nucleus sampling of the rollouts; 1 = off")
    max_new_tokens: int = opt(64, "response length limit; longer responses are cut (truncated)")
    batch_size: int = opt(64, "rows per generate call (hf engine); part of the sampling stream")
    vllm_memory_fraction: float = opt(
        0.3, "vLLM: share of GPU memory (CUDA) or RAM for its KV cache (CPU)"
    )
    vllm_enforce_eager: bool = opt(
        True, "vLLM: true skips CUDA graphs / compilation (faster start)"
    )
    vllm_max_model_len: int | None = opt(None, "vLLM: context length; null = the model's")
    vllm_lora: bool = opt(
        True, "vLLM, LoRA student: serve the adapter (true) or push merged weights (false)"
    )

    def __post_init__(self) -> None:
        _one_of(self.engine, "rollout.engine", ROLLOUT_ENGINES)
        _check(
            0 < self.vllm_memory_fraction < 1,
            "rollout.vllm_memory_fraction",
            f"must be in (0, 1) (the share of GPU memory or RAM for vLLM), "
            f"got {self.vllm_memory_fraction}",
        )
        _check(
            self.vllm_max_model_len is None or self.vllm_max_model_len >= 16,
            "rollout.vllm_max_model_len",
            f"must be >= 16 or null (the model's own limit), got {self.vllm_max_model_len}",
        )
        _check(self.n >= 1, "rollout.n", f"must be >= 1, got {self.n}")
        _check(self.temperature > 0, "rollout.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(self.batch_size >= 1, "rollout.batch_size", "must be >= 1")


@dataclass
class TeacherConfig:
    kind: str = opt(
        "ema", "ema (EMA of the student; ema_rate=0: frozen), trust-region, or external"
    )
    ema_rate: float = opt(
        0.05, "EMA teacher: weight of the student per step; 0 = frozen initial copy"
    )
    trust_region_mix: float = opt(0.5, "trust-region teacher: c in lerp(initial, student, c)")
    external_model: str | None = opt(None, "external teacher: model id or folder (same tokenizer)")
    use_context: bool = opt(True, "false: the teacher sees only the question (standard OPD)")
    layout: str = opt(
        "paper", "teacher prompt: paper, multi-turn (peers as earlier turns), summaries"
    )
    max_prompt_tokens: int = opt(
        2048, "teacher prompts longer than this have their peers shortened"
    )
    templates: TeacherTemplates = field(default_factory=TeacherTemplates)

    def __post_init__(self) -> None:
        _one_of(self.kind, "teacher.kind", TEACHER_KINDS)
        _one_of(self.layout, "teacher.layout", LAYOUTS)
        _check(0 <= self.ema_rate <= 1, "teacher.ema_rate", "must be in [0, 1]")
        _check(0 <= self.trust_region_mix <= 1, "teacher.trust_region_mix", "must be in [0, 1]")
        _check(
            self.kind != "external" or bool(self.external_model),
            "teacher.external_model",
            "teacher.kind=external needs a model id or folder",
        )
        _check(self.max_prompt_tokens >= 16, "teacher.max_prompt_tokens", "must be >= 16")


@dataclass
class LossConfig:
    kind: str = opt("distill", "the objective (mopd.objectives registry); set by method=...")
    topk: int | None = opt(
        100, "distill: teacher's top-k tokens per position; null = full vocabulary"
    )
    add_tail: bool = opt(True, "distill: add the rest of the probability mass as one tail bucket")
    alpha: float = opt(0.5, "distill: 0 forward KL, 1 reverse KL, between: generalised JSD")
    estimator: str = opt(
        "topk", "distill: topk (divergence over top-k) or sampled-token (reverse KL)"
    )
    temperature: float | None = opt(
        None, "logits divided by this in the loss; null = the rollout temperature"
    )
    aggregation: str = opt("token-mean", "token-mean, seq-mean-token-mean or seq-mean-token-sum")
    is_clip: float | None = opt(
        None, "truncated importance-weight cap for stale rollouts; null = off"
    )
    clip_low: float = opt(0.2, "GRPO: PPO ratio clip below 1")
    clip_high: float = opt(0.28, "GRPO: PPO ratio clip above 1")
    normalize_std: bool = opt(False, "GRPO: divide advantages by the group's standard deviation")
    beta: float = opt(0.1, "DPO: beta")
    simpo_beta: float = opt(2.0, "SimPO: beta")
    simpo_gamma: float = opt(0.5, "SimPO: target reward margin gamma")
    grpo_mix: float = opt(0.0, "grpo+distill: lambda of (1-lambda)·GRPO + lambda·distill")
    credit_clip: float = opt(0.2, "signed-credit: teacher/student ratio clipped to 1 +- this")
    contrast_tau: float = opt(0.02, "contrastive-credit: bonus = scale * tanh(difference / tau)")
    contrast_scale: float = opt(0.5, "contrastive-credit: largest bonus")
    contrast_threshold: float = opt(0.02, "contrastive-credit: bonuses this small are dropped")

    def __post_init__(self) -> None:
        _one_of(self.kind, "loss.kind", loss_kinds())
        _check(self.topk is None or self.topk >= 1, "loss.topk", "must be >= 1 or null")
        _check(
            self.temperature is None or self.temperature > 0,
            "loss.temperature",
            "must be > 0 or null (the rollout temperature)",
        )
        _check(0 <= self.alpha <= 1, "loss.alpha", "must be in [0, 1]")
        _one_of(self.estimator, "loss.estimator", ("topk", "sampled-token"))
        _check(
            self.estimator != "sampled-token" or self.alpha == 1.0,
            "loss.estimator",
            "sampled-token is a reverse-KL estimator: set loss.alpha=1",
        )
        _one_of(
            self.aggregation,
            "loss.aggregation",
            ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
        )
        _check(self.is_clip is None or self.is_clip > 0, "loss.is_clip", "must be > 0 or null")
        _check(0 <= self.clip_low < 1, "loss.clip_low", "must be in [0, 1)")
        _check(self.clip_high >= 0, "loss.clip_high", "must be >= 0")
        _check(0 <= self.grpo_mix <= 1, "loss.grpo_mix", "must be in [0, 1]")
        _check(0 <= self.credit_clip < 1, "loss.credit_clip", "must be in [0, 1)")
        _check(self.contrast_tau > 0, "loss.contrast_tau", "must be > 0")
        _check(self.contrast_scale >= 0, "loss.contrast_scale", "must be >= 0")
        _check(self.contrast_threshold >= 0, "loss.contrast_threshold", "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = opt(1e-5, "AdamW learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    warmup_steps: int = opt(10, "linear learning-rate warm-up steps")
    grad_clip: float = opt(1.0, "gradient-norm clip; non-finite norms skip the step")

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # YAML gives a list
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(len(self.betas) == 2, "optim.betas", "needs two values")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.grad_clip > 0, "optim.grad_clip", "must be > 0")


@dataclass
class TrainConfig:
    steps: int = opt(20, "optimizer steps")
    prompts_per_step: int = opt(4, "P: prompts per step (each gets rollout.n rollouts)")
    micro_batch_size: int = opt(8, "rollouts per forward/backward: bounds peak memory")
    seed: int = opt(0, "seeds the prompt order, sampling and peer choice")
    threads: int | None = opt(1, "torch threads; 1 is fastest on small shared CPUs; null = torch's")
    checkpoint_every: int = opt(0, "steps between checkpoints; 0 = only at the end (and on Ctrl-C)")
    keep_checkpoints: int = opt(
        1, "newest complete checkpoints kept; older go once a new one is saved"
    )
    save_rollouts: bool = opt(True, "write sample rollouts with teacher prompts to rollouts.jsonl")
    rollout_samples_per_step: int = opt(2, "groups per step written to rollouts.jsonl")
    save_all_rollouts: bool = opt(
        False, "every rollout of every step -> rollouts_full.jsonl (for analyze)"
    )
    all_rollouts_max_mb: float = opt(200.0, "stop appending to rollouts_full.jsonl at this size")
    rollout_shards: int | None = opt(
        None, "prompt blocks sampled with their own seeds; null = one per process"
    )
    dist_timeout_minutes: float = opt(60.0, "collectives' timeout (rank 0 evaluates alone)")
    parallel: str = opt(
        "replicate", "several processes: replicate (full copies) or fsdp (sharded student)"
    )

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "train.steps", "must be >= 0")
        _check(self.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _check(self.threads is None or self.threads >= 1, "train.threads", "must be >= 1 or null")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.all_rollouts_max_mb > 0, "train.all_rollouts_max_mb", "must be > 0")
        if self.rollout_shards is not None:
            _check(self.rollout_shards >= 1, "train.rollout_shards", "must be >= 1 or null")
            _check(
                self.prompts_per_step % self.rollout_shards == 0,
                "train.rollout_shards",
                f"must divide train.prompts_per_step ({self.prompts_per_step}), "
                f"got {self.rollout_shards}",
            )
        _check(self.dist_timeout_minutes > 0, "train.dist_timeout_minutes", "must be > 0")
        _one_of(self.parallel, "train.parallel", PARALLEL_MODES)


@dataclass
class EvalConfig:
    every: int = opt(10, "steps between evaluations; 0 = only before and after training")
    at_start: bool = opt(
        True, "evaluate the untrained student first (step 0); false: skip it, its score known"
    )
    k: int = opt(4, "samples per eval prompt (mean@k, pass@k)")
    temperature: float = opt(0.6, "eval sampling temperature")
    top_p: float = opt(0.95, "eval nucleus sampling")
    max_prompts: int | None = opt(None, "eval prompts used; null = all of the task's")
    max_new_tokens: int | None = opt(None, "eval response limit; null = rollout.max_new_tokens")

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", "must be >= 0")
        _check(self.k >= 1, "eval.k", "must be >= 1")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        _check(
            self.max_prompts is None or self.max_prompts >= 1,
            "eval.max_prompts",
            f"must be >= 1 or null (all eval prompts), got {self.max_prompts}",
        )
        _check(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "eval.max_new_tokens",
            f"must be >= 1 or null (rollout.max_new_tokens), got {self.max_new_tokens}",
        )


@dataclass
class LoggingConfig:
    output_dir: str = opt("runs", "folder of run folders")
    run_name: str | None = opt(None, "run folder name; null = <method>-<task>-<timestamp>")
    sinks: list[str] = opt_factory(lambda: ["jsonl"], "metric sinks: jsonl, tensorboard, wandb")
    progress: bool = opt(True, "progress bars and evaluation lines on stderr")

    def __post_init__(self) -> None:
        for sink in self.sinks:
            _one_of(sink, "logging.sinks", ("jsonl", "tensorboard", "wandb"))


@dataclass
class Config:
    method: str = opt("mopd", "method preset: " + ", ".join(METHODS))
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    peers: PeerConfig = field(default_factory=PeerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        from mopd.objectives import objective_class  # imports torch: not at module level

        _one_of(self.method, "method", METHODS)
        objective_class(self.loss.kind).check_config(self)  # e.g. enough rollouts per prompt
        _check(
            self.train.parallel != "fsdp" or self.model.lora.r == 0,
            "train.parallel",
            "fsdp does not support LoRA adapters (model.lora.r > 0) yet: use "
            "train.parallel=replicate with LoRA, or model.lora.r=0 with fsdp",
        )


# Each method is a set of overrides applied on top of the defaults, below the recipe.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "mopd": {"loss.kind": "distill", "peers.n_success": 2, "peers.n_failure": 1},
    "mopd-2s": {"loss.kind": "distill", "peers.n_success": 2, "peers.n_failure": 0},
    # The 2S1F teacher as sign-safe token credit, its peers shown as earlier turns: the
    # best peer-conditioned method of the 135M learning benchmark (docs/benchmarks.md).
    "mopd-signed": {
        "loss.kind": "signed-credit",
        "peers.n_success": 2,
        "peers.n_failure": 1,
        "teacher.layout": "multi-turn",
    },
    "sdpo": {
        "loss.kind": "distill",
        "peers.n_success": 1,
        "peers.n_failure": 0,
        "peers.include_feedback": True,
    },
    "grpo": {"loss.kind": "grpo"},
    "opd": {"loss.kind": "distill", "teacher.kind": "external", "teacher.use_context": False},
    "dpo": {"loss.kind": "dpo"},
    "simpo": {"loss.kind": "simpo"},
    "sft": {"loss.kind": "sft"},
}


# ---------------------------------------------------------------- building from dicts


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and _is_section(path):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _section_types() -> dict[str, type]:
    """Dotted path -> dataclass type for every nested section."""
    out: dict[str, type] = {"": Config}

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                out[prefix + f.name] = t  # type: ignore[assignment]
                walk(t, prefix + f.name + ".")  # type: ignore[arg-type]

    walk(Config, "")
    return out


def _is_section(path: str) -> bool:
    return path in _section_types()


def valid_keys() -> list[str]:
    """All settable dotted keys, e.g. ``rollout.temperature``."""
    keys: list[str] = []
    for path, cls in _section_types().items():
        prefix = f"{path}." if path else ""
        for f in dataclasses.fields(cls):
            if not _is_section(prefix + f.name):
                keys.append(prefix + f.name)
    return sorted(keys)


def key_help() -> dict[str, str]:
    """Every settable key's help line, from its field's metadata."""
    out: dict[str, str] = {}
    for path, cls in _section_types().items():
        prefix = f"{path}." if path else ""
        for f in dataclasses.fields(cls):
            if not _is_section(prefix + f.name):
                out[prefix + f.name] = field_help(f)
    return out


def _check_keys(flat: Mapping[str, Any], source: str) -> None:
    known = set(valid_keys())
    for key in flat:
        if key in known or (key.startswith("task.options.") and len(key) > 13):
            continue
        if key in _section_types():  # a section given a single value, e.g. `train: 5`
            raise ConfigError(
                f"{key!r} in {source} is a section: give it keys, e.g. {key}.{_first_key(key)}=..."
            )
        near = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else "; see `mopd train --help`"
        raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def _first_key(section: str) -> str:
    return dataclasses.fields(_section_types()[section])[0].name


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against a field's type, converting what YAML may leave as text.

    YAML reads ``1e-5`` (no dot) as a string; numbers written that way are accepted.
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint in (int, float):
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value) if hint is float else int(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if hint is int and float(value).is_integer():
                return int(value)
            if hint is float:
                return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return origin(_coerce(v, item, path) for v in value)
    elif origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{path}: expected {name}, got {value!r}")


def _build(cls: type, flat: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], flat, path + ".")
        elif path == "task.options":
            opts = dict(flat.get(path) or {})
            opts.update({k[13:]: v for k, v in flat.items() if k.startswith("task.options.")})
            kwargs[f.name] = opts
        elif path in flat:
            kwargs[f.name] = _coerce(flat[path], hints[f.name], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        section = prefix.rstrip(".") or "config"
        raise ConfigError(f"{section}: {exc}") from exc


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. rollout.n=8")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:  # e.g. '*' (an alias) or '@x' (reserved) as text
        problem = getattr(exc, "context", None) or getattr(exc, "problem", None) or "invalid"
        raise ConfigError(
            f"override {key}: cannot parse value {raw!r} as YAML ({problem}); "
            f"to pass it as text, quote it: {key}='\"{raw}\"'"
        ) from exc
    return key.strip(), value


def recipe_path(name_or_path: str) -> Path:
    """A YAML file path, or the name of a packaged recipe (``demo``, ``grpo`` ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named demo is no recipe
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder")
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return path
    packaged = resources.files("mopd") / "configs" / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = sorted(p.name[:-5] for p in (resources.files("mopd") / "configs").iterdir())
        raise ConfigError(f"no config file or packaged recipe {name_or_path!r}; recipes: {names}")
    return Path(str(packaged))


def _overlay(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`; a layer that names another task drops the old task's options."""
    if "task.name" in top and top["task.name"] != base.get("task.name"):
        base = {k: v for k, v in base.items() if not k.startswith("task.options")}
    return {**base, **top}


def _read_recipe(name_or_path: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Flat keys of a recipe; ``extends: OTHER`` loads OTHER first and overlays this one."""
    path = recipe_path(name_or_path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = dict(data)
    parent = data.pop("extends", None)
    flat = _flatten(data)
    _check_keys(flat, str(path))
    if parent is None:
        return flat
    base_name = str(parent)
    if base_name.endswith((".yaml", ".yml")) and not Path(base_name).is_absolute():
        base_name = str(path.parent / base_name)  # relative to the extending file
    return _overlay(_read_recipe(base_name, (*_seen, path)), flat)


def load_config(
    recipe: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> Config:
    """Resolve defaults < method preset < recipe < overrides into a validated Config."""
    recipe_flat = _read_recipe(str(recipe)) if recipe is not None else {}
    if isinstance(overrides, Mapping):
        override_flat = _flatten(overrides)
    else:
        override_flat = dict(_parse_override(item) for item in overrides)
    _check_keys(override_flat, "overrides")

    method = override_flat.get("method", recipe_flat.get("method", Config.method))
    _one_of(method, "method", METHODS)
    flat = _overlay(_overlay(dict(METHOD_PRESETS[method]), recipe_flat), override_flat)
    flat["method"] = method
    config: Config = _build(Config, flat, "")
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-safe) of a config."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)  # type: ignore[no-any-return]


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_saved_config(path: Path, overrides: Sequence[str] = ()) -> Config:
    """A run's resolved ``config.yaml`` plus overrides (e.g. ``train.steps=40`` to extend it).

    The saved file already holds the method preset's values, so no preset is re-applied.
    """
    if not path.exists():
        raise ConfigError(f"{path} not found: is {path.parent} a mopd run folder?")
    flat = _flatten(yaml.safe_load(path.read_text()) or {})
    _check_keys(flat, str(path))
    override_flat = dict(_parse_override(item) for item in overrides)
    _check_keys(override_flat, "overrides")
    return _build(Config, _overlay(flat, override_flat), "")  # type: ignore[no-any-return]
