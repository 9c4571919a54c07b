"""Config resolution: layers, presets, recipes, validation messages."""

from __future__ import annotations

import pytest

from mopd.config import (
    METHODS,
    ConfigError,
    load_config,
    load_saved_config,
    save_config,
    valid_keys,
)

pytestmark = pytest.mark.unit


def test_defaults_and_every_packaged_recipe_resolve():
    assert load_config().method == "mopd"
    for method in METHODS:
        cfg = load_config(method)
        assert cfg.method == method


def test_paper_recipe_holds_the_paper_settings():
    cfg = load_config("paper-8b", ["task.options.data=train.jsonl"])
    assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.rollout.max_new_tokens) == (32, 8, 4096)
    assert (cfg.peers.n_success, cfg.peers.n_failure, cfg.loss.topk, cfg.loss.alpha) == (
        2,
        1,
        100,
        0.5,
    )
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.teacher.ema_rate) == (1e-5, 10, 0.05)
    assert cfg.teacher.max_prompt_tokens == 10240 and cfg.loss.is_clip == 2.0
    assert (cfg.train.parallel, cfg.rollout.engine) == ("fsdp", "vllm")


def test_method_preset_sets_the_loss_and_context():
    cfg = load_config("demo", ["method=sdpo"])
    assert (cfg.loss.kind, cfg.peers.n_success, cfg.peers.n_failure) == ("distill", 1, 0)
    assert cfg.peers.include_feedback is True
    assert load_config("demo", ["method=grpo"]).loss.kind == "grpo"
    opd = load_config("opd")
    assert opd.teacher.kind == "external" and opd.teacher.use_context is False


def test_overrides_win_over_recipe_and_preset():
    cfg = load_config("mopd", ["peers.n_failure=0", "rollout.n=3", "optim.lr=1e-4"])
    assert cfg.peers.n_failure == 0 and cfg.rollout.n == 3
    assert cfg.optim.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as text: coerced


def test_recipe_extends_another(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: demo\nrollout: {n: 5}\n")
    cfg = load_config(str(child))
    assert cfg.rollout.n == 5
    assert cfg.train.prompts_per_step == load_config("demo").train.prompts_per_step


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"rollout\.temperature"):
        load_config("demo", ["rollout.temperatur=0.5"])


def test_unknown_key_in_a_recipe_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lr"):
        load_config(str(bad))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("rollout.n=0", "rollout.n"),
        ("loss.alpha=1.5", "loss.alpha"),
        ("model.dtype=float16", "model.dtype"),
        ("rollout.n=abc", "rollout.n"),
        ("peers.n_success=9", "n_success"),
        ("method=ppo", "method"),
        ("loss.estimator=sampled-token", "loss.estimator"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("demo", [override])


def test_changing_the_task_drops_the_recipe_task_options():
    cfg = load_config("demo", ["task.name=my.module:factory"])
    assert cfg.task.options == {}
    kept = load_config("demo", ["task.options.n_eval=7"])
    assert kept.task.options["n_eval"] == 7 and kept.task.options["digits"] == 1


def test_saved_config_round_trips_with_overrides(tmp_path):
    cfg = load_config("demo", ["rollout.n=3", "teacher.templates.instruction=Solve it."])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_saved_config(tmp_path / "config.yaml", ["train.steps=99"])
    assert again.rollout.n == 3 and again.train.steps == 99
    assert again.teacher.templates.instruction == "Solve it."
    assert again.peers == cfg.peers


def test_valid_keys_cover_nested_sections():
    keys = valid_keys()
    assert "peers.control" in keys and "teacher.templates.failure_header" in keys
    assert "model" not in keys


@pytest.mark.parametrize("method", ["grpo", "mopd", "mopd-2s", "sdpo", "dpo", "simpo"])
def test_group_methods_with_one_rollout_per_prompt_fail_naming_rollout_n(method):
    with pytest.raises(ConfigError, match=r"^rollout\.n: .*needs rollout\.n >= 2, got 1"):
        load_config(None, [f"method={method}", "rollout.n=1"])


@pytest.mark.parametrize("method", ["sft", "opd"])
def test_methods_without_peers_or_groups_train_on_one_rollout(method):
    extra = ["teacher.external_model=some/model"] if method == "opd" else []
    assert load_config(None, [f"method={method}", "rollout.n=1", *extra]).rollout.n == 1


def test_grpo_mix_belongs_to_the_grpo_distill_objective():
    with pytest.raises(ConfigError, match=r"^loss\.grpo_mix: .*set loss\.kind=grpo\+distill"):
        load_config(None, ["method=grpo", "loss.grpo_mix=0.5"])
    with pytest.raises(ConfigError, match=r"^loss\.grpo_mix: loss\.kind=grpo\+distill needs"):
        load_config(None, ["loss.kind=grpo+distill"])
    cfg = load_config(None, ["loss.kind=grpo+distill", "loss.grpo_mix=1"])
    assert cfg.loss.grpo_mix == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.max_prompts=-1", r"^eval\.max_prompts: must be >= 1 or null"),
        ("eval.max_new_tokens=-5", r"^eval\.max_new_tokens: must be >= 1 or null"),
        ("train=5", r"^'train' in overrides is a section: give it keys, e\.g\. train\.steps="),
    ],
)
def test_eval_limits_and_sections_given_a_value_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_override_that_is_not_yaml_says_how_to_pass_it_as_text():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["task.options.operators=*"])
    message = str(e.value)
    assert "\n" not in message and "task.options.operators='\"*\"'" in message
    quoted = load_config(None, ['task.options.operators="*"'])
    assert quoted.task.options["operators"] == "*"


def test_malformed_yaml_names_its_file(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:3:1: not valid YAML: expected ','") as e:
        load_config(str(recipe))
    assert "<unicode string>" not in str(e.value)


def test_a_folder_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()  # e.g. an output folder called demo
    monkeypatch.chdir(tmp_path)
    assert load_config("demo").method == "mopd-signed"
    (tmp_path / "mine.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"mine\.yaml is a folder"):
        load_config("mine.yaml")


def test_every_key_has_a_help_line_in_its_field_metadata():
    from mopd.config import key_help, valid_keys

    helps = key_help()
    assert set(helps) == set(valid_keys())
    assert not [key for key, text in helps.items() if not text.strip()]
