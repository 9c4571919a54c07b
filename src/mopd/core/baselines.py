"""Baseline objectives over the same rollout groups that MOPD distils from.

* **GRPO** (paper setting): advantage = reward - group mean, without dividing by the
  group's standard deviation (optional here); PPO-clip with the asymmetric range
  [1 - 0.2, 1 + 0.28]; no KL penalty; token-mean aggregation.
* **On-policy DPO / SimPO**: every (chosen, rejected) pair of rollouts of one prompt with
  a strictly higher reward for the chosen one. DPO compares summed log-probs against a
  frozen reference; SimPO uses length-normalised log-probs and a margin, no reference.
  ``gamma`` is the absolute margin inside the sigmoid (not a ratio to ``beta``).
* **Verified-success SFT**: token-mean negative log-likelihood of successful rollouts.
* **Mixed objective**: ``(1 - lam) * L_grpo + lam * L_distill``.

Losses are to be minimised. Objectives with nothing to learn from (no pairs, no
successes, everything masked) return exactly 0.0 attached to the graph, so a backward
pass still works and adds zero gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mopd.core.losses import aggregate

# exp() of a log-ratio beyond this is clipped anyway for the common cases; bounding it
# keeps the ratio finite so that 0 * ratio (zero advantage) is never NaN.
_MAX_ABS_LOG_RATIO = 20.0


def group_advantages(
    rewards: Tensor | Sequence[float], *, normalize_std: bool = False, eps: float = 1e-6
) -> Tensor:
    """``r - mean(r)`` within each group (last dimension).  # (G,) or (P, G)

    With ``normalize_std`` the centred rewards are divided by ``std + eps``, using the
    population std (defined for G = 1, where the advantage is 0).
    """
    rewards_PG = torch.as_tensor(rewards)
    if rewards_PG.ndim not in (1, 2) or rewards_PG.shape[-1] == 0:
        raise ValueError(
            f"rewards must have shape [G] or [P, G] with G >= 1, got {tuple(rewards_PG.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not rewards_PG.is_floating_point():
        rewards_PG = rewards_PG.float()
    centred = rewards_PG - rewards_PG.mean(dim=-1, keepdim=True)
    if normalize_std:
        centred = centred / (rewards_PG.std(dim=-1, correction=0, keepdim=True) + eps)
    return centred


def grpo_loss(
    logp_BT: Tensor,
    logp_old_BT: Tensor,
    advantages_B: Tensor,
    mask_BT: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    aggregation: str = "token-mean",
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip surrogate with one advantage per rollout (or per token), negated for minimisation.

    Per token: ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)`` with
    ``r = exp(logp - logp_old)`` (``logp_old`` detached), then :func:`aggregate`
    (``denominator`` is passed through for gradient accumulation).

    Metrics: ``grpo/clip_fraction`` (share of valid tokens whose clipped term is active,
    i.e. that get no gradient) and ``grpo/ratio_mean``.
    """
    if logp_BT.ndim != 2 or logp_old_BT.shape != logp_BT.shape or mask_BT.shape != logp_BT.shape:
        raise ValueError(
            "logp_BT, logp_old_BT and mask_BT must share one [B, T] shape, got "
            f"{tuple(logp_BT.shape)}, {tuple(logp_old_BT.shape)}, {tuple(mask_BT.shape)}"
        )
    if advantages_B.shape not in (logp_BT.shape[:1], logp_BT.shape):
        raise ValueError(
            f"advantages_B must have shape [B] = {tuple(logp_BT.shape[:1])} (one per rollout) "
            f"or [B, T] (one per token), got {tuple(advantages_B.shape)}"
        )
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")

    log_ratio_BT = (logp_BT - logp_old_BT.detach()).clamp(-_MAX_ABS_LOG_RATIO, _MAX_ABS_LOG_RATIO)
    ratio_BT = log_ratio_BT.exp()
    adv = advantages_B.detach()
    adv_B1 = adv.unsqueeze(-1) if adv.ndim == 1 else adv  # or per token: (B, T)
    unclipped_BT = -adv_B1 * ratio_BT
    clipped_BT = -adv_B1 * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = aggregate(
        torch.maximum(unclipped_BT, clipped_BT), mask_BT, aggregation, denominator=denominator
    )

    with torch.no_grad():
        valid_BT = mask_BT != 0
        n_valid = max(int(valid_BT.sum()), 1)
        clip_fraction = float(((clipped_BT > unclipped_BT) & valid_BT).sum()) / n_valid
        ratio_mean = float(torch.where(valid_BT, ratio_BT, 0.0).sum()) / n_valid
    return loss, {"grpo/clip_fraction": clip_fraction, "grpo/ratio_mean": ratio_mean}


def preference_pairs(rewards_G: Sequence[float], *, offset: int = 0) -> list[tuple[int, int]]:
    """All ``(chosen, rejected)`` index pairs of one group with reward[chosen] > reward[rejected].

    Ordered by chosen, then rejected. Ties give no pair. ``offset`` is added to both
    indices, to address rows of a batch that holds several groups back to back.
    """
    rewards = [float(r) for r in rewards_G]
    return [
        (offset + i, offset + j)
        for i, r_i in enumerate(rewards)
        for j, r_j in enumerate(rewards)
        if r_i > r_j
    ]


def sequence_logprobs(logp_BT: Tensor, mask_BT: Tensor, *, length_normalize: bool) -> Tensor:
    """Sum (DPO) or mean (SimPO) of the valid token log-probs of each rollout.  # (B,)"""
    if logp_BT.ndim != 2 or mask_BT.shape != logp_BT.shape:
        raise ValueError(
            "logp_BT and mask_BT must share one [B, T] shape, got "
            f"{tuple(logp_BT.shape)} and {tuple(mask_BT.shape)}"
        )
    valid_BT = mask_BT != 0
    summed_B = torch.where(valid_BT, logp_BT, 0.0).sum(dim=-1)
    if not length_normalize:
        return summed_B
    return summed_B / valid_BT.sum(dim=-1).clamp_min(1)


def _pair_indices(pairs: Sequence[tuple[int, int]], batch: int, device: torch.device) -> Tensor:
    """Validated ``[2, n_pairs]`` long tensor of (chosen, rejected) rows."""
    for chosen, rejected in pairs:
        if not (0 <= chosen < batch and 0 <= rejected < batch) or chosen == rejected:
            raise ValueError(
                f"pair ({chosen}, {rejected}) must hold two different row indices in [0, {batch})"
            )
    return torch.tensor(list(pairs), dtype=torch.long, device=device).reshape(-1, 2).T


def _check_seq_values(name: str, values_B: Tensor) -> None:
    if values_B.ndim != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(values_B.shape)}")


def dpo_loss(
    policy_seq_logp_B: Tensor,
    ref_seq_logp_B: Tensor,
    pairs: Sequence[tuple[int, int]],
    *,
    beta: float = 0.1,
) -> Tensor:
    """Mean over pairs of ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))``.

    ``p*``: policy, ``r*``: reference (detached) summed sequence log-probs of the chosen
    (c) and rejected (r) rollout. No pairs: 0.0 attached to the graph.
    """
    _check_seq_values("policy_seq_logp_B", policy_seq_logp_B)
    if ref_seq_logp_B.shape != policy_seq_logp_B.shape:
        raise ValueError(
            f"ref_seq_logp_B must have shape {tuple(policy_seq_logp_B.shape)}, "
            f"got {tuple(ref_seq_logp_B.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not pairs:
        return policy_seq_logp_B.sum() * 0.0
    chosen, rejected = _pair_indices(pairs, policy_seq_logp_B.shape[0], policy_seq_logp_B.device)
    log_ratio_B = policy_seq_logp_B - ref_seq_logp_B.detach()
    margins = log_ratio_B[chosen] - log_ratio_B[rejected]
    return -F.logsigmoid(beta * margins).mean()


def simpo_loss(
    policy_avg_logp_B: Tensor,
    pairs: Sequence[tuple[int, int]],
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> Tensor:
    """Mean over pairs of ``-logsigmoid(beta * (ac - ar) - gamma)``.

    ``a*``: length-normalised (mean per-token) log-probs of chosen and rejected rollouts.
    No pairs: 0.0 attached to the graph.
    """
    _check_seq_values("policy_avg_logp_B", policy_avg_logp_B)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not pairs:
        return policy_avg_logp_B.sum() * 0.0
    chosen, rejected = _pair_indices(pairs, policy_avg_logp_B.shape[0], policy_avg_logp_B.device)
    margins = policy_avg_logp_B[chosen] - policy_avg_logp_B[rejected]
    return -F.logsigmoid(beta * margins - gamma).mean()


def sft_loss(
    logp_BT: Tensor,
    mask_BT: Tensor,
    success_B: Tensor,
    *,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Token-mean NLL over the valid tokens of successful rollouts only.

    Failed rollouts are masked out entirely (they are neither in the numerator nor in
    the token count); with no success the loss is 0.0 attached to the graph.
    """
    if success_B.shape != logp_BT.shape[:1]:
        raise ValueError(
            f"success_B must have shape [B] = {tuple(logp_BT.shape[:1])}, "
            f"got {tuple(success_B.shape)}"
        )
    keep_BT = (mask_BT != 0) & (success_B != 0).unsqueeze(-1)
    return aggregate(-logp_BT, keep_BT, "token-mean", denominator=denominator)


def mixed_loss(grpo_loss: Tensor, distill_loss: Tensor, lam: float) -> Tensor:
    """``(1 - lam) * grpo_loss + lam * distill_loss``; lam = 1 is pure distillation."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1] (0 pure GRPO, 1 pure distillation), got {lam!r}")
    return (1.0 - lam) * grpo_loss + lam * distill_loss
