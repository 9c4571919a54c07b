"""Sign-safe peer credit against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.core.baselines import grpo_loss
from mopd.core.credit import contrastive_credit, sign_scaled_credit, signed_teacher_credit

pytestmark = pytest.mark.unit


def test_signed_credit_scales_the_advantage_by_the_bounded_teacher_ratio():
    adv = torch.tensor([0.5, -0.5, 0.0])
    teacher = torch.tensor([[math.log(0.9), math.log(0.2)]] * 3)
    student = torch.tensor([[math.log(0.6), math.log(0.4)]] * 3)
    got = signed_teacher_credit(adv, teacher, student, clip=0.2)
    # ratio p_T/p_S = 1.5 and 0.5; A > 0 uses it, A < 0 its inverse; both clipped to [0.8, 1.2].
    expected = torch.tensor([[0.5 * 1.2, 0.5 * 0.8], [-0.5 * 0.8, -0.5 * 1.2], [0.0, 0.0]])
    torch.testing.assert_close(got, expected)
    # Never flips a sign, and is exactly A where teacher and student agree.
    torch.testing.assert_close(
        signed_teacher_credit(adv, student, student), adv[:, None].expand(3, 2)
    )


def test_signed_credit_inside_the_bound_is_the_exact_ratio():
    adv = torch.tensor([2.0])
    got = signed_teacher_credit(
        adv, torch.tensor([[math.log(0.55)]]), torch.tensor([[math.log(0.5)]])
    )
    torch.testing.assert_close(got, torch.tensor([[2.0 * 1.1]]))


def test_sign_scaled_credit_is_signed_credit_at_its_bounds_on_every_token():
    adv = torch.tensor([0.5, -0.25, 0.0])
    got = sign_scaled_credit(adv, 3, clip=0.2)
    expected = torch.tensor([[0.4] * 3, [-0.3] * 3, [0.0] * 3])
    torch.testing.assert_close(got, expected)
    # = signed-credit when the teacher is far less sure than the student of every token.
    teacher, student = torch.full((3, 3), -5.0), torch.zeros(3, 3)
    torch.testing.assert_close(signed_teacher_credit(adv, teacher, student, clip=0.2), got)
    with pytest.raises(ValueError, match="clip"):
        sign_scaled_credit(adv, 3, clip=1.0)


def test_contrastive_credit_adds_a_bounded_bonus_and_keeps_the_sign():
    adv = torch.tensor([0.25, -0.25, 0.0])
    succ = torch.tensor([[0.0, -1.0, -1.0, -1.0]] * 3)
    fail = torch.tensor([[-1.0, 0.0, -1.001, -1.0]] * 3)
    got = contrastive_credit(adv, succ, fail, tau=0.02, scale=0.5, threshold=0.02)
    small = 0.5 * math.tanh(0.001 / 0.02)  # 0.025: above the threshold
    expected = torch.tensor(
        [
            [0.25 + 0.5 * math.tanh(50), max(0.25 - 0.5 * math.tanh(50), 0.0), 0.25 + small, 0.25],
            [
                min(-0.25 + 0.5 * math.tanh(50), 0.0),
                -0.25 - 0.5 * math.tanh(50),
                -0.25 + small,
                -0.25,
            ],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(got, expected)
    tiny = contrastive_credit(adv, succ, fail, tau=1.0, scale=0.01, threshold=0.02)
    torch.testing.assert_close(tiny, adv[:, None].expand(3, 4))  # bonus below the threshold


def test_credits_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="expected advantages"):
        signed_teacher_credit(torch.zeros(2), torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="expected advantages"):
        contrastive_credit(torch.zeros(3), torch.zeros(3, 4), torch.zeros(3, 5))


def test_grpo_loss_takes_per_token_advantages():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    mask = torch.ones(1, 2)
    per_token, _ = grpo_loss(logp, old, torch.tensor([[1.0, -2.0]]), mask)
    # ratio 1 at the sampling policy: loss = -mean(A_t) = 0.5; d loss / d logp_t = -A_t / 2.
    assert float(per_token.detach()) == pytest.approx(0.5)
    per_token.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 1.0]]))
