"""Sign-safe peer credit: token-level advantages whose sign the verifier decides.

Distilling a peer-conditioned teacher (MOPD, SDPO) lets the teacher decide both the
direction and the size of every token's update. When the teacher reads its peers badly
(small models: arXiv 2601.20802 §4.1, and this project's 135M benchmark), it pushes
successes down and lengthens answers. The two credits below keep GRPO's verifier-signed
advantage A and let the teacher only *redistribute* it over the tokens of a rollout; both
feed the PPO-clip surrogate (`core.baselines.grpo_loss`) as per-token advantages.

* :func:`signed_teacher_credit`, after RLSD (arXiv 2604.03128, eq. 13-15)::

      delta_t = stopgrad(log p_teacher(y_t) - log p_student(y_t))
      A_t     = A * clip(exp(sign(A) * delta_t), 1 - eps, 1 + eps)

  A token the conditioned teacher likes more than the student gets more of a positive
  advantage and less of a negative one; ``eps`` (RLSD: 0.2) bounds the reweighting, so
  the sign and, within 20%, the size of every update are the verifier's.

* :func:`contrastive_credit`, after RLCSD (arXiv 2606.11709), built from MOPD's own peers::

      e_t = log p_teacher(y_t | a success peer) - log p_teacher(y_t | a failed peer)
      r_t = scale * tanh(e_t / tau),   r_t = 0 where |r_t| <= threshold
      A_t = A + r_t,  clamped to A's sign (A > 0: >= 0; A < 0: <= 0; A = 0: 0)

  Both contexts show ONE peer under the same header ("Correct solution:"), so whatever
  any hint does to style and length cancels in the difference, and what remains is what
  a correct peer says about y_t that a wrong one does not. RLCSD's defaults: tau 0.02,
  scale 0.5, threshold 0.02; it averages a wrong-hint mixture over up to 4 wrong
  siblings and normalises selected and other tokens separately -- here one failed peer
  (the one MOPD's context shows) and one token mean, which keeps a single teacher
  forward per context.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(adv_B: Tensor, a_BT: Tensor, b_BT: Tensor) -> None:
    if a_BT.ndim != 2 or b_BT.shape != a_BT.shape or adv_B.shape != a_BT.shape[:1]:
        raise ValueError(
            f"expected advantages [B] and two [B, T] log-prob tensors, got "
            f"{tuple(adv_B.shape)}, {tuple(a_BT.shape)}, {tuple(b_BT.shape)}"
        )


def signed_teacher_credit(
    adv_B: Tensor, teacher_logp_BT: Tensor, student_logp_BT: Tensor, *, clip: float = 0.2
) -> Tensor:
    """RLSD token advantages ``A * clip(exp(sign(A) (log p_T - log p_S)), 1 +- clip)``.  # (B, T)

    Detached: the credit is a fixed advantage, not a path for gradients.
    """
    _check(adv_B, teacher_logp_BT, student_logp_BT)
    if not 0 <= clip < 1:
        raise ValueError(f"clip must be in [0, 1), got {clip!r}")
    with torch.no_grad():
        adv_B1 = adv_B.to(teacher_logp_BT.dtype).unsqueeze(-1)
        delta_BT = teacher_logp_BT - student_logp_BT
        weight_BT = (torch.sign(adv_B1) * delta_BT).exp().clamp(1.0 - clip, 1.0 + clip)
        return adv_B1 * weight_BT


def sign_scaled_credit(adv_B: Tensor, length: int, *, clip: float = 0.2) -> Tensor:
    """``A (1 - clip)`` for A > 0 and ``A (1 + clip)`` for A < 0 on every token.  # (B, T)

    The control of :func:`signed_teacher_credit` without a teacher: the weights it takes
    where the teacher is less sure than the student of a token by more than the clip
    (the direction of the 135M teacher's mean gaps, -0.2 on successes and -0.6 on
    failures; docs/benchmarks.md). If signed credit does no better than this control,
    its teacher's per-token information did not matter.
    """
    if not 0 <= clip < 1:
        raise ValueError(f"clip must be in [0, 1), got {clip!r}")
    with torch.no_grad():
        weight_B = torch.where(adv_B > 0, 1.0 - clip, 1.0 + clip).to(adv_B.dtype)
        return (adv_B * weight_B).unsqueeze(-1).expand(-1, length).clone()


def contrastive_credit(
    adv_B: Tensor,
    success_logp_BT: Tensor,
    failure_logp_BT: Tensor,
    *,
    tau: float = 0.02,
    scale: float = 0.5,
    threshold: float = 0.02,
) -> Tensor:
    """RLCSD-style token advantages ``A + scale tanh(e / tau)``, sign-clamped to A.  # (B, T)

    ``e = log p(y | success peer) - log p(y | failed peer)``; rows whose contrast is not
    defined pass zeros for both log-probs (then A_t = A). Detached.
    """
    _check(adv_B, success_logp_BT, failure_logp_BT)
    if not (tau > 0 and scale >= 0 and threshold >= 0):
        raise ValueError(
            f"need tau > 0, scale >= 0, threshold >= 0; got {tau}, {scale}, {threshold}"
        )
    with torch.no_grad():
        adv_B1 = adv_B.to(success_logp_BT.dtype).unsqueeze(-1)
        bonus_BT = scale * torch.tanh((success_logp_BT - failure_logp_BT) / tau)
        bonus_BT = torch.where(bonus_BT.abs() > threshold, bonus_BT, 0.0)
        credit_BT = adv_B1 + bonus_BT
        positive = credit_BT.clamp_min(0.0)
        negative = credit_BT.clamp_max(0.0)
        return torch.where(adv_B1 > 0, positive, torch.where(adv_B1 < 0, negative, 0.0))
