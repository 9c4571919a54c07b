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

Deviation from the reference implementation: the top-k path never makes a
``log_softmax`` of either model. Log-normalisers are reduced a few rows at a time (about
``_CHUNK_BYTES`` of vocabulary-sized temporaries), and the student's backward recomputes
each chunk's softmax instead of keeping it, so beyond its inputs the loss holds only
[B, T, k]-sized tensors between forward and backward, and its backward allocates the
student-logit gradient and one chunk. Half-precision logits are reduced in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


# Rows of a [..., V] tensor reduced at once: bounds the vocabulary-sized temporaries of the
# log-normaliser (forward) and of its gradient (backward) to about this many bytes,
# whatever B, T and V are.
_CHUNK_BYTES = 32 * 2**20


def _row_chunks(n_rows: int, n_vocab: int, itemsize: int) -> list[slice]:
    step = max(1, _CHUNK_BYTES // max(1, n_vocab * itemsize))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _chunk_logsumexp(logits_nV: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """logsumexp(logits / temperature) of a few rows, no autograd.  # (n,)

    One [n, V] temporary in ``dtype``; the shift by the row max keeps every exp in [0, 1]
    with one entry exactly 1, so the sum is >= 1 and its log finite even for logits like
    +-1e4.
    """
    shifted_nV = logits_nV.to(dtype, copy=True)
    shift_n1 = shifted_nV.amax(dim=-1, keepdim=True)
    shifted_nV.sub_(shift_n1)
    if temperature != 1.0:
        shifted_nV.div_(temperature)
    return shift_n1.squeeze(-1) / temperature + shifted_nV.exp_().sum(dim=-1).log()


class _GatheredLogProbs(torch.autograd.Function):
    """log softmax(logits / temperature) read at ``ids``: ``[..., V], [..., K] -> [..., K]``.

    Forward and backward walk the rows in chunks (`_CHUNK_BYTES`), and autograd keeps only
    the inputs and the [...] log-normalisers: no [..., V] tensor lives between forward
    and backward, and the only full-size allocation of the backward is the gradient
    itself. The backward recomputes each chunk's softmax instead of storing it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, ids: Tensor, temperature: float, dtype: torch.dtype
    ) -> Tensor:
        logits_NV = logits.flatten(0, -2)
        lse_N = logits_NV.new_empty(logits_NV.shape[0], dtype=dtype)
        n_rows, n_vocab = logits_NV.shape
        for rows in _row_chunks(n_rows, n_vocab, torch.finfo(dtype).bits // 8):
            lse_N[rows] = _chunk_logsumexp(logits_NV[rows], temperature, dtype)
        lse = lse_N.view(logits.shape[:-1])
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature, ctx.dtype = temperature, dtype
        return logits.gather(-1, ids).to(dtype) / temperature - lse.unsqueeze(-1)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, ids, lse = ctx.saved_tensors
        temperature, dtype = ctx.temperature, ctx.dtype
        logits_NV, ids_NK = logits.flatten(0, -2), ids.flatten(0, -2)
        grad_NK, lse_N1 = grad_out.flatten(0, -2) / temperature, lse.reshape(-1, 1)
        # d/dx_j of sum_k g_k (x_{id_k} / t - lse) = (g at j) / t - softmax_j * sum_k g_k / t
        weight_N1 = grad_NK.sum(dim=-1, keepdim=True)
        grad_NV = torch.empty_like(logits_NV)
        n_rows, n_vocab = logits_NV.shape
        for rows in _row_chunks(n_rows, n_vocab, torch.finfo(dtype).bits // 8):
            part_nV = logits_NV[rows].to(dtype, copy=True)
            if temperature != 1.0:
                part_nV.div_(temperature)
            part_nV.sub_(lse_N1[rows]).exp_().mul_(-weight_N1[rows])
            part_nV.scatter_add_(-1, ids_NK[rows], grad_NK[rows])
            grad_NV[rows] = part_nV
        return grad_NV.view(logits.shape), None, None, None


def _gathered_log_probs(
    logits: Tensor, ids: Tensor, temperature: float, dtype: torch.dtype
) -> Tensor:
    """log softmax(logits / temperature) at ``ids``, reduced in ``dtype``; see the class."""
    out: Tensor = _GatheredLogProbs.apply(logits, ids, temperature, dtype)
    return out


def token_logprobs(logits_BTV: Tensor, ids_BT: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) read at ``ids_BT``.  # (B, T)

    Computed as gathered logit minus logsumexp, row chunk by row chunk, so no [B, T, V]
    temporary exists (float32 for half-precision logits), not a full log-softmax.
    """
    _check_temperature(temperature)
    if logits_BTV.ndim != 3 or ids_BT.shape != logits_BTV.shape[:2]:
        raise ValueError(
            "token_logprobs expects logits [B, T, V] and ids [B, T], "
            f"got {tuple(logits_BTV.shape)} and {tuple(ids_BT.shape)}"
        )
    ids_BT1 = ids_BT.long().unsqueeze(-1)
    dtype = _compute_dtype(logits_BTV)
    return _gathered_log_probs(logits_BTV, ids_BT1, temperature, dtype).squeeze(-1)


def token_entropy(logits_BTV: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy (nats) of softmax(logits / temperature) at every position, no grad.  # (B, T)

    ``logsumexp(l) - sum softmax(l) * l``, row chunk by row chunk in float32 (or float64).
    """
    _check_temperature(temperature)
    dtype = _compute_dtype(logits_BTV)
    with torch.no_grad():
        logits_NV = logits_BTV.flatten(0, -2)
        out_N = logits_NV.new_empty(logits_NV.shape[0], dtype=dtype)
        n_rows, n_vocab = logits_NV.shape
        for rows in _row_chunks(n_rows, n_vocab, torch.finfo(dtype).bits // 8):
            scaled_nV = logits_NV[rows].to(dtype) / temperature
            logp_nV = torch.log_softmax(scaled_nV, dim=-1)
            out_N[rows] = -(logp_nV.exp() * logp_nV).sum(dim=-1)
        return out_N.view(logits_BTV.shape[:-1])


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
    if not add_tail:
        # Renormalised over the k ids: no vocabulary-wide normaliser needed at all.
        with torch.no_grad():
            logq_BTK = teacher_BTV.gather(-1, ids_BTK).to(dtype) / temperature
        logp_BTK = student_BTV.gather(-1, ids_BTK).to(dtype) / temperature
        return torch.log_softmax(logp_BTK, dim=-1), torch.log_softmax(logq_BTK, dim=-1)
    with torch.no_grad():
        logq_BTK = _gathered_log_probs(teacher_BTV, ids_BTK, temperature, dtype)
    logp_BTK = _gathered_log_probs(student_BTV, ids_BTK, temperature, dtype)
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

    Memory beyond the inputs, top-k path: [B, T, k]-sized tensors and, with
    ``add_tail``, one row chunk of vocabulary-sized temporaries (``_CHUNK_BYTES``) at a
    time; backward adds the [B, T, V] gradient of ``student_logits``. The full-vocabulary
    path materialises both log-softmaxes and several same-sized intermediates: use it for
    small vocabularies or checks.
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


def aggregation_count(lengths: Sequence[int], mode: str) -> int:
    """What :func:`aggregate` divides by, from the rows' valid-token counts: all valid
    tokens (token-mean) or the rows with at least one (seq-mean modes).

    Sum it over the micro-batches (and processes) of a step and pass the total as
    ``denominator``.
    """
    _check_mode(mode)
    if mode == "token-mean":
        return int(sum(lengths))
    return sum(1 for n in lengths if n > 0)


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
        denominator = max(1, aggregation_count(valid_BT.sum(dim=-1).tolist(), mode))
    return total / denominator
