"""Per-token distillation divergences, importance weights and masked aggregation.

At every response position the student distribution p and the teacher distribution q
come from ``logits / temperature``. :func:`topk_divergence` compares them on one of two
supports:

* the full vocabulary (``k=None``, or any ``k >= V``: then the top-k set is the whole
  vocabulary and its tail is empty, so the full computation is used directly);
* the **student's** top-k token ids, with the teacher read at the same ids. With
  ``add_tail`` each side gets one more bucket holding the rest of its mass,
  ``log(1 - sum of top-k probs)``, so both are proper (k+1)-point distributions; without
  it both are renormalised over the k ids.

On that support, with alpha in [0, 1]::

    alpha = 0      forward KL(q || p) = sum q (log q - log p)
    alpha = 1      reverse KL(p || q) = sum p (log p - log q)
    0 < alpha < 1  alpha KL(q || m) + (1 - alpha) KL(p || m),  m = (1 - alpha) p + alpha q

(the generalised Jensen-Shannon divergence; the paper uses alpha = 0.5 with top-100 and
the tail bucket). Only the student logits receive gradient: the teacher side, the
top-k ids and importance weights are detached.

:func:`aggregate` reduces a masked per-token loss to a scalar. Rollouts whose mask row is
all zero (no teacher context, padding) add nothing to the numerator *and are not counted
in the denominator*, so masking a rollout does not dilute the others' loss.

Deviation from the reference implementation: log-normalisers are computed with one
in-place ``exp`` over the vocabulary instead of a full ``log_softmax`` of both models,
so the top-k path never holds two extra [B, T, V] tensors; half-precision logits are
reduced in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# A top-k mass within float32 rounding of 1 leaves a tail that is pure noise; capping
# log(top-k mass) here keeps log(1 - mass) finite (about -16) instead of -inf.
_MAX_LOG_TOPK_MASS = -1e-7
# Log-probabilities are floored before the divergence so that -inf logits (masked
# vocabulary entries) give 0 * finite = 0 rather than 0 * inf = NaN.
_LOG_PROB_FLOOR = -1e30


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half-precision inputs, float64 kept as is."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor, ndim: int) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name_a} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _vocab_logsumexp(logits_BTV: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """logsumexp(logits / temperature) over the last dimension, in ``dtype``.  # (B, T)

    Allocates exactly one [B, T, V] tensor in ``dtype``; the shift, the scaling and the
    exp happen in place on it. When ``logits_BTV`` requires grad, autograd keeps that
    tensor (the unnormalised softmax) until backward.
    """
    shift_BT1 = logits_BTV.detach().amax(dim=-1, keepdim=True).to(dtype)
    # Shifting by the row max keeps every exp in [0, 1] with one entry exactly 1, so the
    # sum is >= 1 and its log finite even for logits like +-1e4. The shift is constant
    # for autograd, which is exact: the gradient of logsumexp does not depend on it.
    shifted_BTV = logits_BTV - shift_BT1  # type promotion makes this the dtype copy
    if temperature != 1.0:
        shifted_BTV.div_(temperature)
    shifted_BTV.exp_()
    return shift_BT1.squeeze(-1) / temperature + shifted_BTV.sum(dim=-1).log()


def token_logprobs(logits_BTV: Tensor, ids_BT: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) read at ``ids_BT``.  # (B, T)

    Computed as gathered logit minus logsumexp, so only one [B, T, V] temporary exists
    (float32 for half-precision logits), not a full log-softmax plus its copy.
    """
    _check_temperature(temperature)
    if logits_BTV.ndim != 3 or ids_BT.shape != logits_BTV.shape[:2]:
        raise ValueError(
            "token_logprobs expects logits [B, T, V] and ids [B, T], "
            f"got {tuple(logits_BTV.shape)} and {tuple(ids_BT.shape)}"
        )
    dtype = _compute_dtype(logits_BTV)
    picked_BT = logits_BTV.gather(-1, ids_BT.long().unsqueeze(-1)).squeeze(-1).to(dtype)
    return picked_BT / temperature - _vocab_logsumexp(logits_BTV, temperature, dtype)


def _append_tail(logp_BTK: Tensor) -> Tensor:
    """Append log(1 - sum exp(logp)) as bucket k+1.  # (B, T, K+1)"""
    log_mass_BT1 = torch.logsumexp(logp_BTK, dim=-1, keepdim=True).clamp(max=_MAX_LOG_TOPK_MASS)
    return torch.cat([logp_BTK, torch.log(-torch.expm1(log_mass_BT1))], dim=-1)


def _topk_log_probs(
    student_BTV: Tensor, teacher_BTV: Tensor, k: int, add_tail: bool, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs on the student's top-k ids (+ tail).  # (B, T, K[+1])"""
    dtype = _compute_dtype(student_BTV, teacher_BTV)
    # Positive temperature preserves order, so the raw logits give the same top-k set.
    ids_BTK = student_BTV.detach().topk(k, dim=-1, sorted=False).indices
    # Teacher first: its [B, T, V] temporary is freed before the student's is made.
    with torch.no_grad():
        logq_BTK = teacher_BTV.gather(-1, ids_BTK).to(dtype) / temperature
        if add_tail:
            logq_BTK = logq_BTK - _vocab_logsumexp(teacher_BTV, temperature, dtype).unsqueeze(-1)
    logp_BTK = student_BTV.gather(-1, ids_BTK).to(dtype) / temperature
    if not add_tail:
        # Renormalised over the k ids: no vocabulary-wide normaliser needed at all.
        return torch.log_softmax(logp_BTK, dim=-1), torch.log_softmax(logq_BTK, dim=-1)
    logp_BTK = logp_BTK - _vocab_logsumexp(student_BTV, temperature, dtype).unsqueeze(-1)
    return _append_tail(logp_BTK), _append_tail(logq_BTK)


def _kl(loga: Tensor, logb: Tensor) -> Tensor:
    """KL(a || b) = sum a (log a - log b) over the last dimension."""
    return (loga.exp() * (loga - logb)).sum(dim=-1)


def _divergence(logp: Tensor, logq: Tensor, alpha: float) -> Tensor:
    """Forward KL / reverse KL / generalised JSD between log-prob vectors (last dim)."""
    logp = logp.clamp_min(_LOG_PROB_FLOOR)
    logq = logq.clamp_min(_LOG_PROB_FLOOR)
    if alpha == 0.0:
        return _kl(logq, logp)
    if alpha == 1.0:
        return _kl(logp, logq)
    # log m = log((1 - alpha) p + alpha q), formed in log space so tiny p, q do not underflow.
    logm = torch.logaddexp(logp + math.log1p(-alpha), logq + math.log(alpha))
    return alpha * _kl(logq, logm) + (1.0 - alpha) * _kl(logp, logm)


def topk_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    k: int | None,
    alpha: float,
    add_tail: bool = True,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token divergence between student and teacher next-token distributions.

    Args:
        student_logits: ``[B, T, V]``, the only input that receives gradient.
        teacher_logits: ``[B, T, V]``, detached here; may be another floating dtype.
        k: size of the student's top-k support; ``None`` (or ``k >= V``) = full vocabulary.
        alpha: 0 forward KL(q||p), 1 reverse KL(p||q), in between generalised JSD.
        add_tail: top-k only; add the rest-of-mass bucket instead of renormalising.
        temperature: divides both logits.

    Returns:
        ``[B, T]`` loss in float32 (float64 for float64 inputs); no mask, no reduction.

    Memory beyond the inputs, top-k path: the [B, T, k] tensors, plus with ``add_tail``
    a single [B, T, V] temporary at a time in the compute dtype (the teacher's is freed
    before the student's is made; the student's is kept by autograd for backward).
    Without the tail, none. The full-vocabulary path materialises both log-softmaxes
    and several same-sized intermediates: use it for small vocabularies or checks.
    """
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits, 3)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int or None (full vocabulary), got {k!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (0 forward KL, 1 reverse KL, between: JSD), got {alpha!r}"
        )
    _check_temperature(temperature)
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError("student_logits and teacher_logits must be floating-point tensors")

    if k is None or k >= student_logits.shape[-1]:
        dtype = _compute_dtype(student_logits, teacher_logits)
        with torch.no_grad():
            logq = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        logp = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    else:
        logp, logq = _topk_log_probs(student_logits, teacher_logits, k, add_tail, temperature)
    return _divergence(logp, logq, alpha)


def sampled_token_reverse_kl(student_logp_BT: Tensor, teacher_logp_BT: Tensor) -> Tensor:
    """Single-sample reverse-KL estimator at the sampled tokens y.  # (B, T)

    ``stopgrad(log p(y) - log q(y)) * log p(y)``: its value is not the KL, but since y is
    drawn from p its gradient is an unbiased estimate of grad KL(p || q).
    """
    _check_same_shape("student_logp_BT", student_logp_BT, "teacher_logp_BT", teacher_logp_BT, 2)
    return (student_logp_BT - teacher_logp_BT).detach() * student_logp_BT


def importance_weights(logp_BT: Tensor, logp_old_BT: Tensor, is_clip: float = 2.0) -> Tensor:
    """Detached ``min(exp(logp - logp_old), is_clip)`` per token.  # (B, T)

    Corrects for the student having moved since the rollouts were sampled. The minimum
    is taken in log space, so a huge ratio gives ``is_clip`` rather than inf.
    """
    _check_same_shape("logp_BT", logp_BT, "logp_old_BT", logp_old_BT, 2)
    if not is_clip > 0:
        raise ValueError(f"is_clip must be > 0, got {is_clip!r}")
    with torch.no_grad():
        return (logp_BT - logp_old_BT).clamp(max=math.log(is_clip)).exp()


def aggregation_count(mask_BT: Tensor, mode: str) -> Tensor:
    """What ``aggregate`` divides by: unmasked tokens (token-mean) or sequences with at
    least one unmasked token (seq-mean modes). 0-dim int64 tensor.

    Sum it over the micro-batches of a step and pass the total as ``denominator``.
    """
    _check_mode(mode)
    valid_BT = mask_BT != 0
    if mode == "token-mean":
        return valid_BT.sum()
    return valid_BT.any(dim=-1).sum()


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregation mode must be one of {AGGREGATION_MODES}, got {mode!r}")


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: str,
    *,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar over the unmasked tokens.

    Modes:
        ``token-mean``: sum of unmasked token losses / number of unmasked tokens.
        ``seq-mean-token-mean``: mean over sequences of each sequence's token mean.
        ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.

    Nonzero ``mask_BT`` entries are valid tokens. A rollout with an all-zero mask row
    contributes nothing and is not counted: the seq-mean modes average over sequences
    with at least one valid token only. A fully masked batch gives exactly 0.0, still
    attached to the graph, never NaN. Masked positions may hold inf/NaN (e.g. padding):
    they are selected away, not multiplied by zero.

    Gradient accumulation: by default each call divides by its own count, so the mean of
    micro-batch losses is not the full-batch loss. Pass
    ``aggregate(..., denominator=N)``, with N the step's total
    :func:`aggregation_count`, and the *sum* over micro-batches equals the full-batch
    value.
    """
    _check_same_shape("loss_BT", loss_BT, "mask_BT", mask_BT, 2)
    _check_mode(mode)
    if denominator is not None and not denominator > 0:
        raise ValueError(f"denominator must be > 0 (a global count), got {denominator!r}")
    valid_BT = mask_BT != 0
    masked_BT = torch.where(valid_BT, loss_BT, loss_BT.new_zeros(()))
    if mode == "token-mean":
        total = masked_BT.sum()
    else:
        per_seq_B = masked_BT.sum(dim=-1)
        if mode == "seq-mean-token-mean":
            per_seq_B = per_seq_B / valid_BT.sum(dim=-1).clamp_min(1)
        total = per_seq_B.sum()
    if denominator is None:
        # An all-masked batch has total == 0 (with a graph) and count 0: divide by 1.
        denominator = aggregation_count(mask_BT, mode).clamp_min(1)
    return total / denominator
