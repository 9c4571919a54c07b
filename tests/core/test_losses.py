"""Distillation divergences and aggregation against float64 references written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.core import losses
from mopd.core.losses import (
    AGGREGATION_MODES,
    aggregate,
    aggregation_count,
    importance_weights,
    sampled_token_reverse_kl,
    token_entropy,
    token_logprobs,
    topk_divergence,
)

pytestmark = pytest.mark.unit

ALPHAS = (0.0, 0.3, 0.5, 1.0)


def _reference_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    k: int | None,
    alpha: float,
    add_tail: bool,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Position by position in float64: explicit softmax, top-k by sorting, explicit KL sums."""
    student = student.double()
    teacher = teacher.double().detach()
    batch, time, vocab = student.shape
    rows = []
    for b in range(batch):
        for t in range(time):
            s, q_logits = student[b, t] / temperature, teacher[b, t] / temperature
            p = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
            q = torch.exp(q_logits - q_logits.max()) / torch.exp(q_logits - q_logits.max()).sum()
            if k is not None and k < vocab:
                order = sorted(range(vocab), key=lambda i, s=s: -float(s[i].detach()))[:k]
                p_k, q_k = p[order], q[order]
                if add_tail:
                    p = torch.cat([p_k, (1.0 - p_k.sum()).reshape(1)])
                    q = torch.cat([q_k, (1.0 - q_k.sum()).reshape(1)])
                else:
                    p, q = p_k / p_k.sum(), q_k / q_k.sum()

            def kl(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                return sum((a[i] * torch.log(a[i] / c[i]) for i in range(len(a))), torch.zeros(()))

            if alpha == 0.0:
                rows.append(kl(q, p))
            elif alpha == 1.0:
                rows.append(kl(p, q))
            else:
                m = (1 - alpha) * p + alpha * q
                rows.append(alpha * kl(q, m) + (1 - alpha) * kl(p, m))
    return torch.stack(rows).reshape(batch, time)


def _logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("k", [1, 5, 9, None])
def test_divergence_matches_float64_reference(k, alpha, add_tail):
    student, teacher = _logits(2, 3, 9, seed=1), _logits(2, 3, 9, seed=2)
    expected = _reference_divergence(student, teacher, k=k, alpha=alpha, add_tail=add_tail)
    got = topk_divergence(student, teacher, k=k, alpha=alpha, add_tail=add_tail)
    assert got.shape == (2, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("k", [1, 5, None])
def test_student_gradient_matches_float64_autograd_reference(k, alpha, add_tail):
    student, teacher = _logits(2, 2, 7, seed=3), _logits(2, 2, 7, seed=4)
    weights = _logits(2, 2, seed=5)  # a non-uniform upstream gradient
    ours = student.clone().requires_grad_()
    (topk_divergence(ours, teacher, k=k, alpha=alpha, add_tail=add_tail) * weights).sum().backward()
    reference = student.double().requires_grad_()
    expected = _reference_divergence(reference, teacher, k=k, alpha=alpha, add_tail=add_tail)
    (expected * weights.double()).sum().backward()
    assert ours.grad is not None and reference.grad is not None
    torch.testing.assert_close(ours.grad.double(), reference.grad, atol=2e-6, rtol=1e-5)


def test_float64_inputs_give_float64_gradients_that_pass_gradcheck():
    student = _logits(1, 2, 6, seed=6).double().requires_grad_()
    teacher = _logits(1, 2, 6, seed=7).double()
    for alpha in ALPHAS:
        assert torch.autograd.gradcheck(
            lambda s, a=alpha: topk_divergence(s, teacher, k=3, alpha=a, temperature=0.7),
            (student,),
        )


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("add_tail", [True, False])
def test_k_equal_to_vocab_is_the_full_vocabulary_loss(alpha, add_tail):
    student, teacher = _logits(2, 3, 11, seed=8), _logits(2, 3, 11, seed=9)
    full = _reference_divergence(student, teacher, k=None, alpha=alpha, add_tail=False)
    for k in (11, 50):
        got = topk_divergence(student, teacher, k=k, alpha=alpha, add_tail=add_tail)
        torch.testing.assert_close(got.double(), full, atol=2e-6, rtol=1e-5)


def test_large_vocabulary_top100_with_tail_matches_reference():
    student, teacher = _logits(2, 2, 1000, seed=10), _logits(2, 2, 1000, seed=11)
    for alpha in (0.0, 0.5):
        expected = _reference_divergence(student, teacher, k=100, alpha=alpha, add_tail=True)
        got = topk_divergence(student, teacher, k=100, alpha=alpha)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_row_chunked_normaliser_gives_the_unchunked_loss_and_gradient(monkeypatch, temperature):
    """The top-k path reduces the vocabulary a few rows at a time: chunk edges change nothing."""
    student, teacher = _logits(3, 5, 40, seed=30), _logits(3, 5, 40, seed=31)
    weights = _logits(3, 5, seed=32)

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        ours = student.clone().requires_grad_()
        loss = topk_divergence(ours, teacher, k=6, alpha=0.5, temperature=temperature)
        (loss * weights).sum().backward()
        assert ours.grad is not None
        return loss.detach(), ours.grad

    whole = loss_and_grad()
    monkeypatch.setattr(losses, "_CHUNK_BYTES", 2 * 40 * 4)  # two rows per chunk, 8 chunks
    chunked = loss_and_grad()
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
    reference = student.double().requires_grad_()
    expected = _reference_divergence(
        reference, teacher, k=6, alpha=0.5, add_tail=True, temperature=temperature
    )
    (expected * weights.double()).sum().backward()
    assert reference.grad is not None
    torch.testing.assert_close(chunked[0].double(), expected.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(chunked[1].double(), reference.grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("k", [4, None])
def test_temperature_divides_both_logits(temperature, k):
    student, teacher = _logits(2, 2, 9, seed=12), _logits(2, 2, 9, seed=13)
    expected = _reference_divergence(
        student, teacher, k=k, alpha=0.5, add_tail=True, temperature=temperature
    )
    got = topk_divergence(student, teacher, k=k, alpha=0.5, temperature=temperature)
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(got, topk_divergence(student, teacher, k=k, alpha=0.5))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("k", [1, 4, None])
@pytest.mark.parametrize("add_tail", [True, False])
def test_identical_student_and_teacher_give_zero_loss(alpha, k, add_tail):
    logits = _logits(3, 4, 10, seed=14)
    got = topk_divergence(logits, logits.clone(), k=k, alpha=alpha, add_tail=add_tail)
    torch.testing.assert_close(got, torch.zeros(3, 4), atol=1e-6, rtol=0)


def test_half_jsd_is_symmetric_and_generalised_jsd_swaps_alpha_with_roles():
    a, b = _logits(2, 3, 8, seed=15), _logits(2, 3, 8, seed=16)
    torch.testing.assert_close(
        topk_divergence(a, b, k=None, alpha=0.5), topk_divergence(b, a, k=None, alpha=0.5)
    )
    torch.testing.assert_close(
        topk_divergence(a, b, k=None, alpha=0.3), topk_divergence(b, a, k=None, alpha=0.7)
    )
    # Forward KL with roles swapped is reverse KL.
    torch.testing.assert_close(
        topk_divergence(a, b, k=None, alpha=0.0), topk_divergence(b, a, k=None, alpha=1.0)
    )


@pytest.mark.parametrize("k", [3, None])
def test_teacher_logits_receive_no_gradient(k):
    student = _logits(2, 2, 7, seed=17).requires_grad_()
    teacher = _logits(2, 2, 7, seed=18).requires_grad_()
    topk_divergence(student, teacher, k=k, alpha=0.5).sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("k", [1, 2, None])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_extreme_logits_stay_finite_in_loss_and_gradient(alpha, k, add_tail, temperature):
    student = torch.tensor([[[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, 1e4, 1e4]]], requires_grad=True)
    teacher = torch.tensor([[[-1e4, 1e4, 0.0, -5.0], [1e4, -1e4, -1e4, 0.0]]])
    loss = topk_divergence(
        student, teacher, k=k, alpha=alpha, add_tail=add_tail, temperature=temperature
    )
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_masked_vocabulary_entries_at_minus_infinity_are_ignored():
    student, teacher = _logits(1, 2, 6, seed=19), _logits(1, 2, 6, seed=20)
    padded_s = torch.cat([student, torch.full((1, 2, 3), -math.inf)], dim=-1).requires_grad_()
    padded_t = torch.cat([teacher, torch.full((1, 2, 3), -math.inf)], dim=-1)
    for alpha in ALPHAS:
        expected = _reference_divergence(student, teacher, k=None, alpha=alpha, add_tail=False)
        got = topk_divergence(padded_s, padded_t, k=None, alpha=alpha)
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
        got.sum().backward()
        assert padded_s.grad is not None and torch.isfinite(padded_s.grad).all()


def test_half_precision_logits_are_reduced_in_float32():
    student = _logits(2, 3, 50, seed=21).bfloat16().requires_grad_()
    teacher = _logits(2, 3, 50, seed=22).bfloat16()
    got = topk_divergence(student, teacher, k=10, alpha=0.5)
    assert got.dtype == torch.float32
    expected = _reference_divergence(student.detach(), teacher, k=10, alpha=0.5, add_tail=True)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    got.sum().backward()
    assert student.grad is not None and student.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0, "alpha": 0.5}, "k must be"),
        ({"k": 2.5, "alpha": 0.5}, "k must be"),
        ({"k": True, "alpha": 0.5}, "k must be"),
        ({"k": 3, "alpha": -0.1}, "alpha must be"),
        ({"k": 3, "alpha": 1.5}, "alpha must be"),
        ({"k": 3, "alpha": math.nan}, "alpha must be"),
        ({"k": 3, "alpha": 0.5, "temperature": 0.0}, "temperature must be"),
        ({"k": 3, "alpha": 0.5, "temperature": math.inf}, "temperature must be"),
    ],
)
def test_invalid_arguments_are_rejected_with_the_argument_named(kwargs, message):
    logits = _logits(1, 2, 5, seed=23)
    with pytest.raises(ValueError, match=message):
        topk_divergence(logits, logits, **kwargs)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        topk_divergence(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), k=2, alpha=0.5)
    with pytest.raises(ValueError, match="3 dimensions"):
        topk_divergence(torch.zeros(2, 5), torch.zeros(2, 5), k=2, alpha=0.5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_explicit_log_softmax(temperature):
    logits = _logits(2, 3, 9, seed=24)
    ids = torch.tensor([[0, 4, 8], [3, 3, 1]])
    ours = logits.clone().requires_grad_()
    got = token_logprobs(ours, ids, temperature=temperature)
    reference = logits.double().requires_grad_()
    scaled = reference / temperature
    probs = torch.exp(scaled) / torch.exp(scaled).sum(-1, keepdim=True)
    expected = torch.log(probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    got.sum().backward()
    expected.sum().backward()
    assert ours.grad is not None and reference.grad is not None
    torch.testing.assert_close(ours.grad.double(), reference.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_of_half_precision_logits_are_float32_and_exact(dtype):
    gen = torch.Generator().manual_seed(0)
    logits_BRV = (torch.randn(3, 4, 50, generator=gen) * 5).to(dtype)
    ids_BR = torch.randint(0, 50, (3, 4), generator=gen)
    reference = torch.log_softmax(logits_BRV.double(), dim=-1).gather(-1, ids_BR[..., None])[..., 0]
    got = token_logprobs(logits_BRV, ids_BR)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=0)


def test_token_logprobs_stay_finite_for_extreme_logits():
    logits = torch.tensor([[[1e4, -1e4, 0.0]]], requires_grad=True)
    got = token_logprobs(logits, torch.tensor([[1]]))
    torch.testing.assert_close(got, torch.tensor([[-2e4]]))
    got.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_sampled_token_reverse_kl_value_and_stopped_gradient():
    student = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    teacher = torch.tensor([[-3.0, -0.5]], requires_grad=True)
    got = sampled_token_reverse_kl(student, teacher)
    torch.testing.assert_close(got, torch.tensor([[-2.0, 0.0]]))
    got.sum().backward()
    assert teacher.grad is None
    assert student.grad is not None
    torch.testing.assert_close(student.grad, torch.tensor([[2.0, 0.0]]))


def test_sampled_token_estimator_gradient_is_unbiased_for_reverse_kl():
    """E_{y~p}[grad of the estimator] == grad KL(p||q), checked by enumerating y."""
    student, teacher = _logits(1, 1, 6, seed=25).double(), _logits(1, 1, 6, seed=26).double()
    ours = student.clone().requires_grad_()
    logp = torch.log_softmax(ours, -1)
    logq = torch.log_softmax(teacher, -1)
    # Every vocabulary id as the sampled token, weighted by its (detached) probability.
    per_id = sampled_token_reverse_kl(logp.reshape(1, 6), logq.reshape(1, 6))
    (logp.exp().detach().reshape(1, 6) * per_id).sum().backward()
    reference = student.clone().requires_grad_()
    _reference_divergence(reference, teacher, k=None, alpha=1.0, add_tail=False).sum().backward()
    assert ours.grad is not None and reference.grad is not None
    torch.testing.assert_close(ours.grad, reference.grad)


def test_importance_weights_are_clipped_ratios_without_gradient():
    logp_old = torch.zeros(1, 5)
    logp = torch.tensor([[math.log(0.5), math.log(1.5), math.log(3.0), 1000.0, -1000.0]])
    logp.requires_grad_()
    got = importance_weights(logp, logp_old, is_clip=2.0)
    torch.testing.assert_close(got, torch.tensor([[0.5, 1.5, 2.0, 2.0, 0.0]]))
    assert not got.requires_grad
    with pytest.raises(ValueError, match="is_clip"):
        importance_weights(logp, logp_old, is_clip=0.0)


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 10.0 / 3.0),  # (1 + 2 + 7) / 3 tokens
        ("seq-mean-token-mean", (1.5 + 7.0) / 2.0),  # masked row not counted
        ("seq-mean-token-sum", (3.0 + 7.0) / 2.0),
    ],
)
def test_aggregation_modes_match_hand_values_and_skip_masked_rollouts(mode, expected):
    got = aggregate(LOSS, MASK, mode)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_masked_positions_holding_nan_or_inf_do_not_leak_into_loss_or_gradient():
    loss = LOSS.clone()
    loss[1, 1], loss[0, 2] = math.nan, math.inf
    loss.requires_grad_()
    for mode in AGGREGATION_MODES:
        loss.grad = None
        got = aggregate(loss, MASK, mode)
        got.backward()
        assert torch.isfinite(got)
        assert loss.grad is not None and torch.isfinite(loss.grad).all()
        assert (loss.grad[MASK == 0] == 0).all()


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_fully_masked_batch_gives_exact_zero_with_a_gradient_path(mode):
    loss = torch.tensor([[math.nan, 1.0], [2.0, math.inf]], requires_grad=True)
    got = aggregate(loss, torch.zeros(2, 2, dtype=torch.bool), mode)
    assert got.item() == 0.0
    assert got.requires_grad
    got.backward()
    assert loss.grad is not None
    assert (loss.grad == 0).all()


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_denominator_override_makes_micro_batches_sum_to_the_full_batch_loss(mode):
    loss_full = _logits(6, 5, seed=27).abs().requires_grad_()
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(28)) > 0.4
    mask[2] = False  # a masked rollout inside one micro-batch
    full = aggregate(loss_full, mask, mode)
    (grad_full,) = torch.autograd.grad(full, loss_full)

    chunks = [slice(0, 2), slice(2, 4), slice(4, 6)]
    total = sum(aggregation_count(mask[c].sum(-1).tolist(), mode) for c in chunks)
    accumulated = sum(aggregate(loss_full[c], mask[c], mode, denominator=total) for c in chunks)
    assert isinstance(accumulated, torch.Tensor)
    (grad_accumulated,) = torch.autograd.grad(accumulated, loss_full)
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(grad_accumulated, grad_full)


def test_aggregation_count_counts_tokens_or_non_empty_sequences():
    lengths = (MASK != 0).sum(-1).tolist()
    assert aggregation_count(lengths, "token-mean") == 3
    assert aggregation_count(lengths, "seq-mean-token-mean") == 2
    assert aggregation_count(lengths, "seq-mean-token-sum") == 2
    assert aggregation_count([0, 4, 0], "seq-mean-token-mean") == 1


def test_aggregate_rejects_unknown_mode_bad_denominator_and_shape_mismatch():
    with pytest.raises(ValueError, match="aggregation mode must be one of"):
        aggregate(LOSS, MASK, "sum")
    with pytest.raises(ValueError, match="denominator must be > 0"):
        aggregate(LOSS, MASK, "token-mean", denominator=0)
    with pytest.raises(ValueError, match="same shape"):
        aggregate(LOSS, MASK[:, :2], "token-mean")


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_entropy_matches_the_definition_in_float64(temperature):
    logits = _logits(2, 3, 11, seed=31)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    expected = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(token_entropy(logits, temperature).double(), expected)
    uniform = torch.zeros(1, 1, 8)
    torch.testing.assert_close(token_entropy(uniform), torch.tensor([[math.log(8)]]))
