"""Teacher-signal analysis: condition building on a fixed group, and scoring a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from scipy import stats

from mopd.collect.contexts import chat_prompt_ids
from mopd.evaluation.analysis import (
    analyze_groups,
    build_condition,
    condition_config,
    load_rollout_groups,
)
from mopd.types import Problem, Rollout, Verdict


def _problem(i: int) -> Problem:
    return Problem(id=f"p{i}", messages=({"role": "user", "content": f"Question {i}?"},))


def _group(tokenizer, texts, rewards):
    rollouts = [Rollout(tuple(tokenizer.encode(t, add_special_tokens=False)), (), t) for t in texts]
    return rollouts, [Verdict(r) for r in rewards]


@pytest.fixture
def two_groups(tokenizer):
    g0, v0 = _group(tokenizer, ["ok one", "ok two", "bad three", "bad four"], [1, 1, 0, 0])
    g1, v1 = _group(tokenizer, ["no five", "no six"], [0, 0])
    return [_problem(0), _problem(1)], [g0, g1], [v0, v1]


def _contexts(tokenizer, data, name):
    config = condition_config(name, policy="first")
    inputs, built = build_condition(tokenizer, *data, config, seed=0)
    return [[(t.context.successes, t.context.failures) for t in row] for row in inputs], built


@pytest.mark.unit
def test_2s1f_on_two_successes_two_failures_matches_hand_expectations(tokenizer, two_groups):
    contexts, built = _contexts(tokenizer, two_groups, "2S1F")
    # A success sees the one other success (itself excluded) and the first failure;
    # a failure sees both successes and the other failure.
    assert contexts[0] == [((1,), (2,)), ((0,), (2,)), ((0, 1), (3,)), ((0, 1), (2,))]
    assert built[0] == [False, False, True, True]
    # No success in group 1: each failure sees the other one only.
    assert contexts[1] == [((), (1,)), ((), (0,))]
    assert built[1] == [False, False]


@pytest.mark.unit
def test_1s_and_1f_are_fully_built_on_a_mixed_group(tokenizer, two_groups):
    contexts, built = _contexts(tokenizer, two_groups, "1S")
    assert contexts[0] == [((1,), ()), ((0,), ()), ((0,), ()), ((0,), ())]
    assert built[0] == [True] * 4 and built[1] == [False, False]
    contexts, built = _contexts(tokenizer, two_groups, "1F")
    assert contexts[0] == [((), (2,)), ((), (2,)), ((), (3,)), ((), (2,))]
    assert all(built[0]) and all(built[1])


@pytest.mark.unit
def test_base_condition_is_the_plain_student_prompt(tokenizer, two_groups):
    problems = two_groups[0]
    inputs, built = build_condition(tokenizer, *two_groups, condition_config("base"), seed=0)
    plain = tuple(chat_prompt_ids(tokenizer, problems[0].messages))
    assert all(t.prompt_ids == plain for t in inputs[0])
    assert all(all(row) for row in built)


@pytest.mark.unit
def test_unrelated_prompt_control_only_shows_other_prompts_successes(tokenizer, two_groups):
    config = condition_config("unrelated_prompt", policy="first")
    inputs, built = build_condition(tokenizer, *two_groups, config, seed=0)
    # Group 0's peers must come from group 1, which has no success: contexts stay empty.
    assert all(t.context.is_empty for t in inputs[0])
    # Group 1's single failure slot is filled by one success of group 0.
    for t in inputs[1]:
        assert len(t.context.foreign_successes) == 1
        assert t.context.foreign_successes[0] in {(0, 0), (0, 1)}
        assert not t.context.successes and not t.context.failures
    assert not any(built[1])  # 2S1F's budget is three blocks


@pytest.mark.unit
def test_unknown_condition_names_the_choices():
    with pytest.raises(ValueError, match=r"2S1F.*random_peer"):
        condition_config("3S")


@pytest.mark.integration
def test_scores_match_an_unpadded_forward_and_auc_matches_scipy(tokenizer, tiny_model, two_groups):
    problems, groups, verdicts = two_groups
    result = analyze_groups(
        tiny_model,
        tokenizer,
        problems,
        groups,
        verdicts,
        ["base", "1S1F"],
        policy="first",
        n_boot=50,
    )
    base, mixed = result.conditions
    # Independent score of rollout 2 of group 0 under 1S1F: one unpadded float64 forward.
    inputs, _ = build_condition(
        tokenizer, problems, groups, verdicts, condition_config("1S1F", policy="first"), seed=0
    )
    prompt, response = inputs[0][2].prompt_ids, groups[0][2].response_ids
    ids = torch.tensor([[*prompt, *response]])
    with torch.no_grad():
        logits = tiny_model.double()(ids).logits[0]
    tiny_model.float()
    logp = torch.log_softmax(logits, -1)
    expected = [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response)]
    assert mixed.scores[0][2] == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert mixed.score_sums[0][2] == pytest.approx(sum(expected), abs=1e-3)
    # The base teacher reads the student's prompt: the gap is exactly zero.
    assert all(g == 0.0 for row in base.gaps for gaps in row for g in gaps)
    assert len(mixed.gaps[0][2]) == len(response)
    pos = [s for s, v in zip(mixed.scores[0], verdicts[0], strict=True) if v.reward]
    neg = [s for s, v in zip(mixed.scores[0], verdicts[0], strict=True) if not v.reward]
    auc = stats.mannwhitneyu(pos, neg).statistic / 4
    summary = mixed.summary["both_present"]["success_auc"]
    assert summary.n_prompts == 1 and summary.mean == pytest.approx(auc)
    assert result.meta["n_both_present"] == 1
    assert mixed.overview()["built_fraction"] == pytest.approx(4 / 6)  # group 1 has no success


@pytest.mark.unit
def test_rollout_file_groups_by_step_and_problem(tmp_path, tokenizer):
    records = [
        {"step": 1, "problem": "a", "question": "Q?", "response": "x", "reward": 1.0},
        {
            "step": 1,
            "problem": "a",
            "question": "Q?",
            "response": "y",
            "reward": 0.0,
            "truncated": True,
        },
        {
            "step": 2,
            "problem": "a",
            "question": "Q?",
            "response": "z",
            "reward": 0.0,
            "response_ids": [5, 6],
            "messages": [{"role": "user", "content": "Q?"}],
        },
    ]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    problems, groups, verdicts = load_rollout_groups(path, tokenizer)
    assert [p.id for p in problems] == ["a@1", "a@2"]
    assert [len(g) for g in groups] == [2, 1]
    x_ids = tuple(tokenizer.encode("x", add_special_tokens=False))
    assert groups[0][0].response_ids == (*x_ids, tokenizer.eos_token_id)
    assert groups[0][1].response_ids == tuple(tokenizer.encode("y", add_special_tokens=False))
    assert groups[1][0].response_ids == (5, 6)
    assert [v.reward for v in verdicts[0]] == [1.0, 0.0]


@pytest.mark.unit
def test_full_rollout_file_stops_growing_at_its_size_cap(tmp_path, capsys):
    from types import SimpleNamespace

    from mopd.config import Config
    from mopd.training.step import StepOutput
    from mopd.training.trainer import FULL_ROLLOUTS_FILE, Trainer

    config = Config()
    config.train.all_rollouts_max_mb = 300 / 2**20  # 300 bytes: one step's records exceed it
    owner = SimpleNamespace(run_dir=tmp_path, config=config, _full_rollouts_capped=False)
    rollouts = [Rollout((1, 2), (-0.1, -0.2), "ab"), Rollout((3,), (-0.3,), "c")]
    output = StepOutput([_problem(0)], [rollouts], [[Verdict(1.0), Verdict(0.0)]], None)
    Trainer._save_all(owner, 1, output)  # type: ignore[arg-type]
    size = (tmp_path / FULL_ROLLOUTS_FILE).stat().st_size
    assert size > 300
    Trainer._save_all(owner, 2, output)  # type: ignore[arg-type]
    Trainer._save_all(owner, 3, output)  # type: ignore[arg-type]
    assert (tmp_path / FULL_ROLLOUTS_FILE).stat().st_size == size
    assert capsys.readouterr().err.count("all_rollouts_max_mb") == 1
    lines = (tmp_path / FULL_ROLLOUTS_FILE).read_text().splitlines()
    assert [json.loads(line)["response_ids"] for line in lines] == [[1, 2], [3]]


def test_diagnostics_per_condition_and_layout(tokenizer, tiny_model, two_groups):
    problems, groups, verdicts = two_groups
    result = analyze_groups(
        tiny_model, tokenizer, problems, groups, verdicts, ["base", "1S1F"], policy="first",
        n_boot=20, layouts=("paper", "multi-turn"),
    )  # fmt: skip
    assert [c.name for c in result.conditions] == ["base", "1S1F", "1S1F@multi-turn"]
    base, paper, multi = (c.overview() for c in result.conditions)
    # The base teacher is the student on its own prompt: no gap, the same end-of-turn mass.
    assert base["entropy_gap"] == 0.0 and base["gap_success"] == 0.0
    assert base["p_eot_teacher"] == base["p_eot_student"]
    # Independent P(last token) of the two successes under each layout's teacher prompt.
    for name, over in (("paper", paper), ("multi-turn", multi)):
        config = condition_config("1S1F", policy="first")
        inputs, _ = build_condition(
            tokenizer, problems, groups, verdicts, config, seed=0, layout=name
        )
        probs = []
        for i in (0, 1):  # the successes of group 0
            prompt, response = inputs[0][i].prompt_ids, groups[0][i].response_ids
            with torch.no_grad():
                logits = tiny_model(torch.tensor([[*prompt, *response]])).logits[0]
            probs.append(float(torch.softmax(logits[-2].double(), -1)[response[-1]]))
        assert over["p_eot_teacher"] == pytest.approx(sum(probs) / 2, rel=1e-4)
        assert over["p_eot_student"] == base["p_eot_student"]
        gaps = result.conditions[1 if name == "paper" else 2].gaps
        failures = [*gaps[0][2:], *gaps[1]]  # every failure of both groups
        assert over["gap_failure"] == pytest.approx(sum(sum(g) / len(g) for g in failures) / 4)
        successes = gaps[0][:2]  # the successes of group 0 (group 1 has none)
        first = sum(g[0] for g in successes) / 2
        assert over["gap_first_success"] == pytest.approx(first)
        assert first != pytest.approx(over["gap_success"])  # not the mean over tokens


def test_diagnostics_read_both_models_at_the_score_temperature(tokenizer, tiny_model, two_groups):
    problems, groups, verdicts = two_groups
    result = analyze_groups(
        tiny_model, tokenizer, problems, groups, verdicts, ["base"], n_boot=10, temperature=0.5
    )
    plain = chat_prompt_ids(tokenizer, problems[0].messages)
    probs = []
    for rollout in groups[0][:2]:  # the two successes
        ids = torch.tensor([[*plain, *rollout.response_ids]])
        with torch.no_grad():
            logits = tiny_model(ids).logits[0, -2].double()
        probs.append(float(torch.softmax(logits / 0.5, -1)[rollout.response_ids[-1]]))
    assert result.conditions[0].overview()["p_eot_student"] == pytest.approx(
        sum(probs) / 2, rel=1e-4
    )
    assert result.meta["score_temperature"] == 0.5
