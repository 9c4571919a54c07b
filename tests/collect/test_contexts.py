"""Teacher inputs: chat-templated teacher prompts built from peer contexts."""

from __future__ import annotations

import pytest

from mopd.collect.contexts import build_teacher_inputs, chat_prompt_ids
from mopd.core.peers import PeerConfig
from mopd.core.prompts import DEFAULT_TEMPLATES, render_teacher_prompt
from mopd.types import Problem, Rollout, Verdict

pytestmark = pytest.mark.integration

PROBLEM = Problem(id="p", messages=({"role": "user", "content": "What is 2 + 3?"},), answer=5)


def _group(texts: list[str], rewards: list[float]):
    rollouts = [Rollout(response_ids=(1, 2), logprobs=(-0.1, -0.2), text=t) for t in texts]
    verdicts = [Verdict(reward=r, feedback=None if r else "wrong") for r in rewards]
    return rollouts, verdicts


def _inputs(tokenizer, rewards, *, peers=None, max_tokens=2048, use_context=True):
    texts = [f"answer {i}" for i in range(len(rewards))]
    rollouts, verdicts = _group(texts, rewards)
    return build_teacher_inputs(
        tokenizer,
        [PROBLEM],
        [rollouts],
        [verdicts],
        peers=peers or PeerConfig.named("2S1F"),
        templates=DEFAULT_TEMPLATES,
        max_prompt_tokens=max_tokens,
        use_context=use_context,
        seed=0,
    )[0], texts


def test_teacher_prompt_is_the_rendered_context_in_the_chat_template(tokenizer):
    inputs, texts = _inputs(tokenizer, [1, 1, 1, 0])
    first = inputs[0]  # a success: sees two other successes and the failure
    assert first.has_context and len(first.context.successes) == 2
    expected_text = render_teacher_prompt(
        PROBLEM.question,
        [texts[j] for j in first.context.successes],
        [texts[j] for j in first.context.failures],
    )
    assert first.text == expected_text
    messages = [{"role": "user", "content": expected_text}]
    assert list(first.prompt_ids) == chat_prompt_ids(tokenizer, messages)
    decoded = tokenizer.decode(first.prompt_ids)
    assert decoded.rstrip().endswith("assistant")  # generation header kept at the end


def test_lone_success_without_failures_gets_no_context_and_the_plain_prompt(tokenizer):
    inputs, _ = _inputs(tokenizer, [1], peers=PeerConfig.named("2S1F"))
    assert not inputs[0].has_context
    assert list(inputs[0].prompt_ids) == chat_prompt_ids(tokenizer, PROBLEM.messages)


def test_budget_too_small_for_any_peer_leaves_rollout_without_context(tokenizer):
    plain = len(chat_prompt_ids(tokenizer, PROBLEM.messages))
    inputs, _ = _inputs(tokenizer, [1, 1, 0], max_tokens=plain + 2)
    assert all(not t.has_context for t in inputs)
    assert all(t.truncated for t in inputs)


def test_question_only_teacher_gives_every_rollout_the_loss(tokenizer):
    inputs, _ = _inputs(tokenizer, [0, 0], use_context=False)
    assert all(t.has_context for t in inputs)
    assert all(list(t.prompt_ids) == chat_prompt_ids(tokenizer, PROBLEM.messages) for t in inputs)


def test_context_sums_count_the_peers_shown_and_a_controls_shortfall(tokenizer):
    from mopd.collect.contexts import context_sums

    rewards = [1, 0, 0, 0]  # one success: successes are scarce for the control
    inputs, _ = _inputs(tokenizer, rewards)
    rollouts, verdicts = _group([f"answer {i}" for i in range(4)], rewards)
    sums = context_sums([inputs], [rollouts], [verdicts], peers=PeerConfig.named("2S1F"), seed=0)
    assert sums["rollouts"] == 4
    shown = sum(len(t.context.successes) for t in inputs)
    assert sums["mean_successes"] == pytest.approx(shown)
    assert "control_shortfall" not in sums
    # success_only_matched swaps each failure slot for another success: with one success
    # in the group, rollouts that showed a failure cannot fill that slot.
    peers = PeerConfig.named("2S1F", control="success_only_matched")
    controlled = build_teacher_inputs(
        tokenizer, [PROBLEM], [rollouts], [verdicts], peers=peers, templates=DEFAULT_TEMPLATES,
        max_prompt_tokens=2048, use_context=True, seed=0,
    )  # fmt: skip
    sums = context_sums(controlled, [rollouts], [verdicts], peers=peers, seed=0)
    uncontrolled_failures = sum(len(t.context.failures) > 0 for t in inputs)
    assert uncontrolled_failures > 0
    assert sums["control_shortfall"] == uncontrolled_failures


def test_multi_turn_layout_closes_every_peer_with_the_end_of_turn_token(tokenizer):
    texts = ["5", "six", "5!", "4"]
    rollouts, verdicts = _group(texts, [1, 0, 1, 0])
    inputs = build_teacher_inputs(
        tokenizer, [PROBLEM], [rollouts], [verdicts], peers=PeerConfig.named("1S1F"),
        templates=DEFAULT_TEMPLATES, max_prompt_tokens=2048, use_context=True, seed=0,
        layout="multi-turn",
    )[0]  # fmt: skip
    t = inputs[1]  # a failure: shown the other failure (3) and a success
    success, failure = texts[t.context.successes[0]], texts[t.context.failures[0]]
    again = "\n\nSolve the question again:\n\n" + PROBLEM.question
    expected = [
        {"role": "user", "content": PROBLEM.question},
        {"role": "assistant", "content": success},
        {"role": "user", "content": "That answer is correct." + again},
        {"role": "assistant", "content": failure},
        {"role": "user", "content": "That answer is wrong. Avoid repeating this mistake." + again},
    ]
    assert list(t.prompt_ids) == chat_prompt_ids(tokenizer, expected)
    # Each peer's tokens are followed by the template's end-of-turn token, as a response is.
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = list(t.prompt_ids)
    for peer in (success, failure):
        peer_ids = tokenizer.encode(peer, add_special_tokens=False)
        starts = [i for i in range(len(ids)) if ids[i : i + len(peer_ids)] == peer_ids]
        assert any(ids[s + len(peer_ids)] == end for s in starts), peer
    assert t.has_context and "[assistant]" in t.text


def test_contrast_prompts_show_one_peer_each_under_the_same_header(tokenizer):
    texts = ["5", "six", "5!", "4"]
    rollouts, verdicts = _group(texts, [1, 0, 1, 0])
    inputs = build_teacher_inputs(
        tokenizer, [PROBLEM], [rollouts], [verdicts], peers=PeerConfig.named("2S1F"),
        templates=DEFAULT_TEMPLATES, max_prompt_tokens=2048, use_context=True, seed=0,
        contrast=True,
    )[0]  # fmt: skip
    for t in inputs:
        ctx = t.context
        if not (ctx.successes and ctx.failures):
            assert t.contrast_ids is None
            continue
        assert t.contrast_ids is not None
        for ids, peer in zip(t.contrast_ids, (ctx.successes[0], ctx.failures[0]), strict=True):
            text = render_teacher_prompt(PROBLEM.question, [texts[peer]], [])
            messages = [{"role": "user", "content": text}]
            assert list(ids) == chat_prompt_ids(tokenizer, messages)
    assert any(t.contrast_ids for t in inputs)
    plain = build_teacher_inputs(
        tokenizer, [PROBLEM], [rollouts], [verdicts], peers=PeerConfig.named("2S1F"),
        templates=DEFAULT_TEMPLATES, max_prompt_tokens=2048, use_context=True, seed=0,
    )[0]  # fmt: skip
    assert all(t.contrast_ids is None for t in plain)
