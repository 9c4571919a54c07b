"""Per-token loss assembly: from logits to the ``[B, R]`` losses that are aggregated.

The training objectives call these, so the code tested here is the code that trains:

* :func:`tempered` divides logits by the rollout temperature. Rollouts are sampled from
  ``softmax(logits / T)``, so an engine's sampling log-probs, PPO ratios and importance
  weights compare against the student at the same T.
* :func:`distill_token_loss` picks the divergence estimator of the distillation loss.
* :func:`importance_weighted` corrects a per-token loss for the student having moved
  since the rollouts were sampled (truncated importance weights).
* :func:`engine_agreement` counts how far the engine's log-probs are from the student's
  recomputation (within a step they share weights, so any gap is the engine's numerics).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mopd.core.losses import (
    importance_weights,
    sampled_token_reverse_kl,
    topk_divergence,
)

ESTIMATORS = ("topk", "sampled-token")


def tempered(logits_BRV: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` (the same tensor at T = 1)."""
    return logits_BRV if temperature == 1.0 else logits_BRV / temperature


def distill_token_loss(
    student_BRV: Tensor,
    teacher_BRV: Tensor,
    student_logp_BR: Tensor,
    teacher_logp_BR: Tensor,
    *,
    estimator: str,
    k: int | None,
    alpha: float,
    add_tail: bool,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token divergence between student and teacher at the response tokens.  # (B, R)

    ``topk``: :func:`topk_divergence` of ``logits / temperature`` (the paper's estimator);
    ``sampled-token``: the single-sample reverse-KL estimator from the log-probs of the
    sampled tokens, which the caller computed at the same temperature (``alpha`` must be
    1). Only the student side receives gradient.
    """
    if estimator == "topk":
        return topk_divergence(
            student_BRV, teacher_BRV, k=k, alpha=alpha, add_tail=add_tail, temperature=temperature
        )
    if estimator == "sampled-token":
        if alpha != 1.0:
            raise ValueError("the sampled-token estimator is reverse KL only: alpha must be 1")
        return sampled_token_reverse_kl(student_logp_BR, teacher_logp_BR.detach())
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def importance_weighted(
    loss_BR: Tensor, sampling_logp_BR: Tensor, old_logp_BR: Tensor, is_clip: float | None
) -> Tensor:
    """``loss * min(p / p_old, is_clip)`` per token; unchanged when `is_clip` is None."""
    if is_clip is None:
        return loss_BR
    return loss_BR * importance_weights(sampling_logp_BR, old_logp_BR, is_clip)


def engine_agreement(
    sampling_logp_BR: Tensor, old_logp_BR: Tensor, mask_BR: Tensor, is_clip: float | None
) -> dict[str, float]:
    """Sums over valid tokens: ``|log p - log p_engine|``, token count, tokens over the cap.

    ``is_clipped`` counts tokens whose ratio exceeds `is_clip` (0 when there is no cap).
    """
    with torch.no_grad():
        valid_BR = mask_BR != 0
        delta_BR = torch.where(valid_BR, sampling_logp_BR.detach() - old_logp_BR, 0.0)
        clipped = 0.0
        if is_clip is not None:
            clipped = float(((delta_BR > math.log(is_clip)) & valid_BR).sum())
        return {
            "mismatch_abs": float(delta_BR.abs().sum()),
            "mismatch_tokens": float(valid_BR.sum()),
            "is_clipped": clipped,
        }
