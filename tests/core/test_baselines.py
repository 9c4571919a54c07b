"""GRPO, DPO, SimPO, SFT and mixed objectives against hand-computed values."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from mopd.core.baselines import (
    dpo_loss,
    group_advantages,
    grpo_loss,
    mixed_loss,
    preference_pairs,
    sequence_logprobs,
    sft_loss,
    simpo_loss,
)

pytestmark = pytest.mark.unit


def _softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x)), by hand."""
    return math.log(1.0 + math.exp(-x))


def test_group_advantages_subtract_the_group_mean_without_std_scaling():
    got = group_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    expected = torch.tensor([0.625, -0.375, -0.375, 0.625, 0.625, -0.375, -0.375, -0.375])
    torch.testing.assert_close(got, expected)


def test_group_advantages_are_per_row_for_prompt_by_group_rewards():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    got = group_advantages(rewards)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 0.0], [-1 / 3, 2 / 3, -1 / 3]]))


def test_group_advantages_std_normalisation_uses_population_std():
    got = group_advantages(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.5]]), normalize_std=True)
    std = math.sqrt(2.0 / 9.0)  # population std of (0, 1, 0)
    expected = torch.tensor([[-1 / 3 / std, 2 / 3 / std, -1 / 3 / std], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(group_advantages([1.0], normalize_std=True), torch.tensor([0.0]))


def test_group_advantages_reject_bad_shapes():
    with pytest.raises(ValueError, match="rewards must have shape"):
        group_advantages(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="rewards must have shape"):
        group_advantages([])


def _grpo_inputs(ratios: list[float], advantages: list[float]):
    logp = torch.tensor([[math.log(r)] for r in ratios], requires_grad=True)
    logp_old = torch.zeros(len(ratios), 1)
    mask = torch.ones(len(ratios), 1)
    return logp, logp_old, torch.tensor(advantages), mask


def test_grpo_clipping_matches_hand_values_and_blocks_gradients_beyond_the_clip():
    # Row: (ratio, advantage) -> per-token loss, d loss / d logp (before the 1/4 mean):
    # (1.5, +1): clipped at 1.28 -> -1.28, 0   | (0.5, +1): unclipped -> -0.5, -0.5
    # (1.5, -1): unclipped -> 1.5, 1.5         | (0.7, -1): clipped at 0.8 -> 0.8, 0
    logp, logp_old, adv, mask = _grpo_inputs([1.5, 0.5, 1.5, 0.7], [1.0, 1.0, -1.0, -1.0])
    loss, metrics = grpo_loss(logp, logp_old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor((-1.28 - 0.5 + 1.5 + 0.8) / 4))
    loss.backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [-0.125], [0.375], [0.0]]))
    assert metrics["grpo/clip_fraction"] == pytest.approx(0.5)
    assert metrics["grpo/ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.5 + 0.7) / 4)


def test_grpo_upper_clip_is_asymmetric():
    logp, logp_old, adv, mask = _grpo_inputs([1.25], [1.0])
    loss, metrics = grpo_loss(logp, logp_old, adv, mask)  # 1.25 < 1 + 0.28: not clipped
    torch.testing.assert_close(loss, torch.tensor(-1.25))
    assert metrics["grpo/clip_fraction"] == 0.0
    loss, metrics = grpo_loss(logp, logp_old, adv, mask, clip_high=0.2)
    torch.testing.assert_close(loss, torch.tensor(-1.2))
    assert metrics["grpo/clip_fraction"] == 1.0


def test_grpo_on_policy_loss_is_minus_mean_advantage_over_valid_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.2, -0.1]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor((2.0 + 2.0 - 1.0) / -3))
    loss.backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def test_grpo_zero_advantage_with_huge_ratio_is_zero_not_nan():
    logp = torch.tensor([[100.0]], requires_grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == 0.0
    assert logp.grad is not None and torch.isfinite(logp.grad).all()


def test_grpo_rejects_mismatched_advantages_and_bad_clip():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages_B"):
        grpo_loss(logp, logp, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip_low"):
        grpo_loss(logp, logp, torch.zeros(2), torch.ones(2, 3), clip_low=1.0)


def test_preference_pairs_hand_example():
    assert preference_pairs([1.0, 0.0, 1.0, 0.5]) == [(0, 1), (0, 3), (2, 1), (2, 3), (3, 1)]
    assert preference_pairs([0.0, 1.0], offset=8) == [(9, 8)]


def test_preference_pairs_exhaustively_over_small_groups():
    for size in range(5):
        for rewards in itertools.product((0.0, 0.5, 1.0), repeat=size):
            pairs = preference_pairs(rewards)
            assert all(rewards[c] > rewards[r] for c, r in pairs)
            assert len(set(pairs)) == len(pairs)
            # Strictly ordered pairs = (G^2 - sum of squared tie-class sizes) / 2.
            ties = sum(n * n for n in Counter(rewards).values())
            assert len(pairs) == (size * size - ties) // 2


def test_sequence_logprobs_sum_or_average_valid_tokens():
    logp = torch.tensor([[-1.0, -2.0, math.nan], [-4.0, -5.0, -6.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    summed = sequence_logprobs(logp, mask, length_normalize=False)
    torch.testing.assert_close(summed, torch.tensor([-3.0, -15.0, 0.0]))
    averaged = sequence_logprobs(logp, mask, length_normalize=True)
    torch.testing.assert_close(averaged, torch.tensor([-1.5, -5.0, 0.0]))


def test_dpo_loss_matches_hand_values_and_ignores_reference_gradient():
    policy = torch.tensor([-10.0, -12.0, -11.0], requires_grad=True)
    ref = torch.tensor([-11.0, -11.0, -11.0], requires_grad=True)
    loss = dpo_loss(policy, ref, [(0, 1), (2, 1)], beta=0.1)
    # Margins: (1 - (-1)) = 2 and (0 - (-1)) = 1.
    expected = (_softplus_neg(0.2) + _softplus_neg(0.1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert ref.grad is None
    sig = [1 / (1 + math.exp(0.2)), 1 / (1 + math.exp(0.1))]  # sigmoid(-beta * margin)
    expected_grad = torch.tensor([-0.1 * sig[0], 0.1 * (sig[0] + sig[1]), -0.1 * sig[1]]) / 2
    assert policy.grad is not None
    torch.testing.assert_close(policy.grad, expected_grad)


def test_simpo_loss_matches_hand_values():
    avg = torch.tensor([-0.5, -1.0, -2.0], requires_grad=True)
    loss = simpo_loss(avg, [(0, 1), (0, 2), (1, 2)], beta=2.0, gamma=0.5)
    # beta * margin - gamma: 2 * 0.5 - 0.5, 2 * 1.5 - 0.5, 2 * 1.0 - 0.5.
    expected = (_softplus_neg(0.5) + _softplus_neg(2.5) + _softplus_neg(1.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("which", ["dpo", "simpo"])
def test_no_pairs_give_exact_zero_with_a_gradient_path(which):
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss = dpo_loss(policy, torch.zeros(2), []) if which == "dpo" else simpo_loss(policy, [])
    assert loss.item() == 0.0
    loss.backward()
    assert policy.grad is not None and (policy.grad == 0).all()


def test_pairs_with_out_of_range_or_repeated_rows_are_rejected():
    with pytest.raises(ValueError, match="pair"):
        simpo_loss(torch.zeros(3), [(0, 3)])
    with pytest.raises(ValueError, match="pair"):
        dpo_loss(torch.zeros(3), torch.zeros(3), [(1, 1)])


def test_sft_loss_is_token_mean_nll_over_successful_rollouts_only():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, math.nan], [-5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 1], [1, 1]])
    loss = sft_loss(logp, mask, torch.tensor([True, False, True]))
    torch.testing.assert_close(loss, torch.tensor((1.0 + 2.0 + 5.0 + 6.0) / 4))
    loss.backward()
    assert logp.grad is not None
    torch.testing.assert_close(
        logp.grad, torch.tensor([[-0.25, -0.25], [0.0, 0.0], [-0.25, -0.25]])
    )


def test_sft_loss_without_success_is_exact_zero():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = sft_loss(logp, torch.ones(1, 2), torch.tensor([0.0]))
    assert loss.item() == 0.0
    loss.backward()


def test_mixed_loss_interpolates_and_validates_lambda():
    grpo, distill = torch.tensor(2.0), torch.tensor(10.0)
    torch.testing.assert_close(mixed_loss(grpo, distill, 0.25), torch.tensor(4.0))
    torch.testing.assert_close(mixed_loss(grpo, distill, 1.0), distill)
    with pytest.raises(ValueError, match="lam must be in"):
        mixed_loss(grpo, distill, 1.5)
