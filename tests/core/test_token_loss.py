"""Per-token loss assembly, against hand-computed values and the functions it composes."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.core.losses import sampled_token_reverse_kl, topk_divergence
from mopd.core.token_loss import (
    distill_token_loss,
    engine_agreement,
    importance_weighted,
    tempered,
)

pytestmark = pytest.mark.unit


def test_tempered_divides_by_the_temperature_and_keeps_t1_as_is():
    logits = torch.tensor([[[1.0, 2.0]]])
    assert tempered(logits, 1.0) is logits
    torch.testing.assert_close(tempered(logits, 0.5), torch.tensor([[[2.0, 4.0]]]))


def test_distill_token_loss_dispatches_on_the_estimator():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    s_lp, t_lp = torch.randn(2, 3), torch.randn(2, 3)
    common = {"k": 4, "add_tail": True}
    got = distill_token_loss(s, t, s_lp, t_lp, estimator="topk", alpha=0.5, **common)
    torch.testing.assert_close(got, topk_divergence(s, t, k=4, alpha=0.5, add_tail=True))
    got = distill_token_loss(s, t, s_lp, t_lp, estimator="sampled-token", alpha=1.0, **common)
    torch.testing.assert_close(got, sampled_token_reverse_kl(s_lp, t_lp))
    with pytest.raises(ValueError, match="alpha must be 1"):
        distill_token_loss(s, t, s_lp, t_lp, estimator="sampled-token", alpha=0.5, **common)
    with pytest.raises(ValueError, match="estimator must be one of"):
        distill_token_loss(s, t, s_lp, t_lp, estimator="nope", alpha=0.5, **common)


def test_importance_weighted_caps_the_ratio_and_is_off_without_a_cap():
    loss = torch.tensor([[2.0, 2.0]])
    now = torch.tensor([[math.log(0.5), math.log(8.0)]])
    old = torch.zeros(1, 2)
    assert importance_weighted(loss, now, old, None) is loss
    torch.testing.assert_close(importance_weighted(loss, now, old, 2.0), torch.tensor([[1.0, 4.0]]))


def test_engine_agreement_sums_over_valid_tokens_only():
    now = torch.tensor([[0.0, -1.0, 5.0], [-2.0, 0.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, 0.0], [-2.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = engine_agreement(now, old, mask, is_clip=2.0)
    # |deltas| on valid tokens: 1, 0, 0.5; only the first exceeds log 2.
    assert got == {"mismatch_abs": 1.5, "mismatch_tokens": 3.0, "is_clipped": 1.0}
    assert engine_agreement(now, old, mask, is_clip=None)["is_clipped"] == 0.0
