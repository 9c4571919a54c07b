"""HFRolloutEngine against a plain forward pass of the same tiny model.

The references below recompute every log-prob in float64 from `model(prompt + response)`
with temperature and nucleus filtering written out here, independently of `generate`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mopd.rollout import HFRolloutEngine, RolloutEngine, SamplingParams
from mopd.rollout.base import reporting_rows
from mopd.types import Rollout

TOL = 1e-4


@pytest.fixture
def sharp_model(tiny_model):
    """The tiny model with logits scaled to std ~1.6 (from ~0.16).

    At random init the next-token distribution is nearly uniform over 49k tokens, which
    would make temperature and top-p almost invisible; scaling the final norm gives a
    peaked but still diverse distribution.
    """
    with torch.no_grad():
        tiny_model.model.norm.weight.mul_(10.0)
    return tiny_model


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    """Two prompts of different lengths, so chunks need left padding."""
    return [
        tokenizer("What is 3 + 5?")["input_ids"],
        tokenizer("Compute 12 * 7 and reply with the final answer only, please.")["input_ids"],
    ]


@pytest.fixture
def eos_biased(sharp_model, tokenizer) -> Iterator[torch.nn.Module]:
    """The model with +9 added to the EOS logit: EOS gets roughly 10-20% of the mass per step,
    so responses of a few tokens end with EOS and others run out of length."""
    bias_V = torch.zeros(len(tokenizer))
    bias_V[tokenizer.eos_token_id] = 9.0
    handle = sharp_model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias_V)
    yield sharp_model
    handle.remove()


def _reference_logprobs_TV(
    model: torch.nn.Module, prompt: list[int], response: tuple[int, ...], temperature: float
) -> torch.Tensor:
    """float64 log-softmax(logits / temperature) at each response position, (T, V)."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits_TV = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return torch.log_softmax(logits_TV.double() / temperature, dim=-1)


def _nucleus_mask_TV(logprobs_TV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens whose strictly-more-probable predecessors hold less than `top_p` mass."""
    probs_TV = logprobs_TV.exp()
    sorted_TV, order_TV = probs_TV.sort(dim=-1, descending=True)
    mass_before_TV = sorted_TV.cumsum(dim=-1) - sorted_TV
    keep_sorted_TV = mass_before_TV < top_p
    return torch.zeros_like(keep_sorted_TV).scatter(-1, order_TV, keep_sorted_TV)


def _flat(groups: list[list[Rollout]]) -> list[Rollout]:
    return [rollout for group in groups for rollout in group]


@pytest.mark.integration
def test_returns_n_rollouts_per_prompt_with_one_logprob_per_token(tiny_model, tokenizer, prompts):
    engine = HFRolloutEngine(tiny_model, tokenizer, batch_size=3)  # 2 x 4 rows -> chunks 3, 3, 2
    params = SamplingParams(max_new_tokens=5)
    reported: list[int] = []
    with reporting_rows(reported.append):  # progress: one report per chunk
        groups = engine.generate(prompts, n=4, params=params, seed=0)
    assert reported == [3, 3, 2]
    assert len(groups) == 2
    assert all(len(group) == 4 for group in groups)
    for rollout in _flat(groups):
        assert 1 <= len(rollout.response_ids) <= 5
        assert len(rollout.logprobs) == len(rollout.response_ids)
        assert all(lp <= 0.0 for lp in rollout.logprobs)
    assert engine.generate([], n=3, params=params, seed=0) == []


@pytest.mark.integration
def test_same_seed_reproduces_and_other_seed_differs(tiny_model, tokenizer, prompts):
    engine = HFRolloutEngine(tiny_model, tokenizer, batch_size=3)
    params = SamplingParams(max_new_tokens=6)
    first = engine.generate(prompts, n=3, params=params, seed=123)
    again = engine.generate(prompts, n=3, params=params, seed=123)
    other = engine.generate(prompts, n=3, params=params, seed=124)
    assert first == again
    assert [r.response_ids for r in _flat(first)] != [r.response_ids for r in _flat(other)]


@pytest.mark.integration
def test_logprobs_equal_plain_forward_at_temperature(eos_biased, tokenizer, prompts):
    temperature = 0.7
    engine = HFRolloutEngine(eos_biased, tokenizer, batch_size=3)
    params = SamplingParams(temperature=temperature, max_new_tokens=8)
    groups = engine.generate(prompts, n=4, params=params, seed=7)
    lengths = {len(r.response_ids) for r in _flat(groups)}
    assert len(lengths) > 1, "want responses of different lengths in one batch"
    for prompt, group in zip(prompts, groups, strict=True):
        for rollout in group:
            reference_TV = _reference_logprobs_TV(
                eos_biased, prompt, rollout.response_ids, temperature
            )
            expected_T = reference_TV.gather(
                -1, torch.tensor(rollout.response_ids)[:, None]
            ).squeeze(-1)
            torch.testing.assert_close(
                torch.tensor(rollout.logprobs, dtype=torch.float64), expected_T, atol=TOL, rtol=0
            )


@pytest.mark.integration
def test_top_p_samples_stay_in_nucleus_with_renormalised_logprobs(sharp_model, tokenizer, prompts):
    temperature, top_p = 0.9, 0.5
    engine = HFRolloutEngine(sharp_model, tokenizer)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=6)
    groups = engine.generate(prompts, n=6, params=params, seed=3)
    for prompt, group in zip(prompts, groups, strict=True):
        for rollout in group:
            logprobs_TV = _reference_logprobs_TV(
                sharp_model, prompt, rollout.response_ids, temperature
            )
            keep_TV = _nucleus_mask_TV(logprobs_TV, top_p)
            tokens_T1 = torch.tensor(rollout.response_ids)[:, None]
            assert keep_TV.gather(-1, tokens_T1).all(), "a sampled token lies outside the nucleus"
            nucleus_mass_T = logprobs_TV.masked_fill(~keep_TV, -torch.inf).logsumexp(-1)
            expected_T = logprobs_TV.gather(-1, tokens_T1).squeeze(-1) - nucleus_mass_T
            torch.testing.assert_close(
                torch.tensor(rollout.logprobs, dtype=torch.float64), expected_T, atol=TOL, rtol=0
            )


@pytest.mark.integration
def test_response_ends_at_first_eos_and_truncated_iff_no_eos(eos_biased, tokenizer, prompts):
    eos = tokenizer.eos_token_id
    max_new = 10
    engine = HFRolloutEngine(eos_biased, tokenizer, batch_size=8)
    groups = engine.generate(prompts, n=16, params=SamplingParams(max_new_tokens=max_new), seed=11)
    rollouts = _flat(groups)
    for rollout in rollouts:
        ids = rollout.response_ids
        assert eos not in ids[:-1], "tokens after the first EOS must be dropped"
        if rollout.truncated:
            assert len(ids) == max_new and ids[-1] != eos
        else:
            assert ids[-1] == eos and len(ids) <= max_new
        assert rollout.text == tokenizer.decode(list(ids), skip_special_tokens=True)
        assert tokenizer.eos_token not in rollout.text
    assert any(r.truncated for r in rollouts) and not all(r.truncated for r in rollouts)
    assert any(len(r.response_ids) < max_new for r in rollouts)


@pytest.mark.integration
def test_certain_eos_gives_empty_text_not_truncated(sharp_model, tokenizer, prompts):
    bias_V = torch.zeros(len(tokenizer))
    bias_V[tokenizer.eos_token_id] = 1e4
    sharp_model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias_V)
    engine = HFRolloutEngine(sharp_model, tokenizer)
    groups = engine.generate(prompts, n=2, params=SamplingParams(max_new_tokens=4), seed=0)
    for rollout in _flat(groups):
        assert rollout == Rollout(
            response_ids=(tokenizer.eos_token_id,), logprobs=(0.0,), text="", truncated=False
        )


@pytest.mark.integration
def test_model_generation_config_does_not_leak_into_sampling(tiny_model, tokenizer, prompts):
    leaky = tiny_model.generation_config
    leaky.top_k = 1  # greedy if inherited: all rows of a prompt would be identical
    leaky.repetition_penalty = 5.0
    leaky.no_repeat_ngram_size = 1
    leaky.min_new_tokens = 3
    engine = HFRolloutEngine(tiny_model, tokenizer)
    groups = engine.generate(prompts, n=4, params=SamplingParams(max_new_tokens=4), seed=5)
    for prompt, group in zip(prompts, groups, strict=True):
        assert len({r.response_ids for r in group}) > 1
        for rollout in group:
            reference_TV = _reference_logprobs_TV(tiny_model, prompt, rollout.response_ids, 1.0)
            expected_T = reference_TV.gather(
                -1, torch.tensor(rollout.response_ids)[:, None]
            ).squeeze(-1)
            torch.testing.assert_close(
                torch.tensor(rollout.logprobs, dtype=torch.float64), expected_T, atol=TOL, rtol=0
            )
    assert tiny_model.generation_config is leaky and leaky.top_k == 1


@pytest.mark.integration
def test_samples_in_eval_mode_and_restores_training_mode_and_caller_rng(
    tiny_model, tokenizer, prompts
):
    modes_seen: list[bool] = []
    tiny_model.register_forward_pre_hook(lambda module, _args: modes_seen.append(module.training))
    tiny_model.train()
    torch.manual_seed(2024)
    expected_next = torch.rand(3)
    torch.manual_seed(2024)
    engine = HFRolloutEngine(tiny_model, tokenizer)
    engine.generate(prompts, n=2, params=SamplingParams(max_new_tokens=3), seed=0)
    torch.testing.assert_close(torch.rand(3), expected_next, atol=0, rtol=0)
    assert modes_seen and not any(modes_seen)
    assert tiny_model.training


@pytest.mark.integration
def test_engine_satisfies_protocol_and_update_weights_switches_model(tiny_model, tokenizer):
    from conftest import make_tiny_model

    engine = HFRolloutEngine(tiny_model, tokenizer)
    assert isinstance(engine, RolloutEngine)
    other = make_tiny_model(tokenizer, seed=1)
    engine.update_weights(other)
    assert engine.model is other


@pytest.mark.integration
def test_generate_rejects_bad_arguments(tiny_model, tokenizer, prompts):
    engine = HFRolloutEngine(tiny_model, tokenizer)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="n "):
        engine.generate(prompts, n=0, params=params, seed=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([prompts[0], []], n=1, params=params, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        HFRolloutEngine(tiny_model, tokenizer, batch_size=0)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_sampling_params_reject_out_of_range_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**kwargs)


@pytest.mark.unit
def test_sampling_params_reject_wrong_types():
    with pytest.raises(TypeError, match=r"SamplingParams\.max_new_tokens"):
        SamplingParams(max_new_tokens=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"SamplingParams\.temperature"):
        SamplingParams(temperature="1")  # type: ignore[arg-type]
    assert SamplingParams() == SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=256)


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    from mopd.rollout.hf import draw

    probs = torch.tensor([0.5, 0.0, 0.3, 1e-3, 0.199, 0.0])
    rows = 200_000
    logp = probs.log().expand(rows, -1).contiguous()
    torch.manual_seed(0)
    counts = torch.bincount(draw(logp), minlength=len(probs)).double() / rows
    assert counts[1] == 0 and counts[5] == 0  # zero probability: never, at either end
    sigma = (probs.double() * (1 - probs.double()) / rows).sqrt()
    assert ((counts - probs.double()).abs() <= 5 * sigma + 1e-12).all(), counts
    # One certain token among 152k of probability e-40 each: drawn every time.
    tiny = torch.full((151_936,), -40.0)
    tiny[7] = 0.0
    tiny = tiny.log_softmax(-1).expand(4, -1)
    torch.manual_seed(1)
    assert draw(tiny).tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_draw_refuses_scores_that_are_not_a_distribution(bad):
    from mopd.rollout.hf import draw

    logp = torch.log_softmax(torch.zeros(2, 5), -1)
    logp[1] = bad
    with pytest.raises(FloatingPointError, match="NaN, infinite or all -inf"):
        draw(logp)
