"""Matched-budget peer controls: keep a context's budget, change what fills it.

A peer context adds tokens, demonstrations and same-prompt success/failure structure
all at once. The controls below start from the *uncontrolled* context that
`mopd.core.peers` would build for a rollout and keep its budget fixed, so that an
ablation isolates *who* fills the slots:

- `random_peer`: the same number of success and failure slots, filled with peers drawn
  uniformly from the rollout's own group (never itself, no repeats) regardless of
  their verifier labels. Display positions keep their headings, so a failed rollout can
  sit under "Correct solution:".
- `unrelated_prompt`: every slot filled with *successful* rollouts of other prompts of
  the batch (`PeerContext.foreign_successes`).
- `success_only_matched`: the shown successes are kept and each failure slot is replaced
  by another success of the same prompt (not the rollout itself, not already shown).

The budget is either the block count (`control_match="block"`) or the peers' total
response-token length (`"token"`). Token rule: candidates are visited in a random order
and added while the running total is below the uncontrolled context's peer tokens, so
the result reaches the budget and overshoots it by at most the last peer added.

When the pool runs dry (few other rollouts, no spare success, no successes elsewhere in
the batch) the missing slots stay empty: a control never repeats a peer, never shows the
rollout itself and never borrows from another control. `control_shortfall_fraction`
measures how often that happened so that it can be logged next to the ablation.

The environment-feedback block is left exactly as in the uncontrolled context: controls
change peers only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from mopd.types import PeerContext

__all__ = [
    "control_shortfall_fraction",
    "random_peer_context",
    "success_only_context",
    "unrelated_prompt_context",
]

_T = TypeVar("_T")


def _own_tokens(context: PeerContext, lengths_G: Sequence[int]) -> int:
    """Response tokens of the same-group peers shown in `context`."""
    return sum(lengths_G[j] for j in (*context.successes, *context.failures))


def _draw(
    pool: Sequence[_T],
    rng: random.Random,
    *,
    n_blocks: int,
    token_budget: int | None,
    cost: Callable[[_T], int],
) -> list[_T]:
    """Draw distinct items of `pool` at random: `n_blocks` of them, or, when
    `token_budget` is given, until their summed `cost` reaches it (see module docstring).
    """
    if token_budget is None:
        return rng.sample(list(pool), min(n_blocks, len(pool)))
    chosen: list[_T] = []
    total = 0
    for item in rng.sample(list(pool), len(pool)):  # a random permutation
        if total >= token_budget:
            break
        chosen.append(item)
        total += cost(item)
    return chosen


def random_peer_context(
    base: PeerContext,
    index: int,
    group_size: int,
    rng: random.Random,
    *,
    lengths_G: Sequence[int] | None = None,
) -> PeerContext:
    """Refill `base`'s peer slots with label-blind draws from rollout `index`'s group.

    `lengths_G` (tokens per rollout of the group, shape (G,)) switches to token
    matching. Block matching keeps the success/failure slot counts; token matching fills
    success slots first (up to `base`'s success count), the rest go to failure slots.
    """
    others = [j for j in range(group_size) if j != index]
    n_success = len(base.successes)
    budget = None if lengths_G is None else _own_tokens(base, lengths_G)
    chosen = _draw(
        others,
        rng,
        n_blocks=n_success + len(base.failures),
        token_budget=budget,
        cost=lambda j: lengths_G[j] if lengths_G is not None else 1,
    )
    return PeerContext(
        successes=tuple(chosen[:n_success]),
        failures=tuple(chosen[n_success:]),
        use_feedback=base.use_feedback,
    )


def success_only_context(
    base: PeerContext,
    index: int,
    success_G: Sequence[bool],
    rng: random.Random,
    *,
    lengths_G: Sequence[int] | None = None,
) -> PeerContext:
    """Replace `base`'s failure slots by further same-prompt successes.

    Spare successes exclude rollout `index` and those already shown. With `lengths_G`
    the replacements are drawn until they reach the failures' token count instead.
    """
    shown = set(base.successes)
    spare = [j for j, ok in enumerate(success_G) if ok and j != index and j not in shown]
    budget = None if lengths_G is None else sum(lengths_G[j] for j in base.failures)
    extra = _draw(
        spare,
        rng,
        n_blocks=len(base.failures),
        token_budget=budget,
        cost=lambda j: lengths_G[j] if lengths_G is not None else 1,
    )
    return PeerContext(successes=(*base.successes, *extra), use_feedback=base.use_feedback)


def unrelated_prompt_context(
    base: PeerContext,
    foreign_pool: Sequence[tuple[int, int]],
    rng: random.Random,
    *,
    lengths_G: Sequence[int] | None = None,
    lengths_per_group: Sequence[Sequence[int]] | None = None,
) -> PeerContext:
    """Fill all of `base`'s peer slots with successes of other prompts.

    `foreign_pool` lists (group, index) of the successes of every *other* group. For
    token matching pass both `lengths_G` (this rollout's group, to measure `base`) and
    `lengths_per_group` (to measure the foreign peers).
    """
    budget = None
    if lengths_G is not None:
        if lengths_per_group is None:
            raise ValueError("token matching needs lengths_per_group for the foreign peers")
        budget = _own_tokens(base, lengths_G)
    chosen = _draw(
        foreign_pool,
        rng,
        n_blocks=len(base.successes) + len(base.failures),
        token_budget=budget,
        cost=lambda gj: lengths_per_group[gj[0]][gj[1]] if lengths_per_group is not None else 1,
    )
    return PeerContext(foreign_successes=tuple(chosen), use_feedback=base.use_feedback)


def control_shortfall_fraction(
    controlled_per_group: Sequence[Sequence[PeerContext]],
    uncontrolled_per_group: Sequence[Sequence[PeerContext]],
    *,
    lengths_per_group: Sequence[Sequence[int]] | None = None,
) -> float:
    """Fraction of rollouts whose controlled context falls short of its budget.

    The budget is the uncontrolled context's peer-block count, or its peer tokens when
    `lengths_per_group` is given (use the same `control_match` as the selection). Returns
    0.0 for an empty batch.
    """
    if len(controlled_per_group) != len(uncontrolled_per_group):
        raise ValueError("controlled and uncontrolled contexts must cover the same groups")

    def size(context: PeerContext, group: int) -> int:
        peers = (*context.successes, *context.failures)
        if lengths_per_group is None:
            return len(peers) + len(context.foreign_successes)
        own = sum(lengths_per_group[group][j] for j in peers)
        return own + sum(lengths_per_group[g][j] for g, j in context.foreign_successes)

    n_rollouts = n_short = 0
    for g, (controlled, uncontrolled) in enumerate(
        zip(controlled_per_group, uncontrolled_per_group, strict=True)
    ):
        if len(controlled) != len(uncontrolled):
            raise ValueError(f"group {g}: controlled and uncontrolled group sizes differ")
        for c, u in zip(controlled, uncontrolled, strict=True):
            n_rollouts += 1
            n_short += size(c, g) < size(u, g)
    return n_short / n_rollouts if n_rollouts else 0.0
