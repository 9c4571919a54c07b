"""Matched-budget peer controls: budgets kept, slots refilled as each control promises."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from mopd.core.peer_controls import control_shortfall_fraction
from mopd.core.peers import PeerConfig, group_seed, select_peers, select_peers_batch
from mopd.types import PeerContext

pytestmark = pytest.mark.unit

PATTERNS_8 = [list(p) for p in itertools.product((0.0, 1.0), repeat=8)]


def _mixed_batch(n_groups: int, group_size: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[float(rng.random() < 0.4) for _ in range(group_size)] for _ in range(n_groups)]


def _budget_check(peer_lengths: list[int], budget: int, pool_size: int, where: str) -> None:
    """Token rule: reach the budget, overshoot by at most the last peer; or use up the pool."""
    total = sum(peer_lengths)
    if budget == 0:
        assert peer_lengths == [], where
    elif total < budget:
        assert len(peer_lengths) == pool_size, where  # ran out of candidates
    else:
        assert total - peer_lengths[-1] < budget, where


@pytest.mark.parametrize("name", ["1S", "2S", "1F", "1S1F", "2S1F"])
def test_random_peer_keeps_slot_counts_without_self_or_repeats(name: str) -> None:
    config = PeerConfig.named(name, control="random_peer")
    plain = replace(config, control="none")
    for rewards in PATTERNS_8:
        base = select_peers(rewards, plain, seed=4)
        for i, (ctx, ref) in enumerate(
            zip(select_peers(rewards, config, seed=4), base, strict=True)
        ):
            peers = ctx.successes + ctx.failures
            assert len(ctx.successes) == len(ref.successes), (rewards, i)
            assert len(ctx.failures) == len(ref.failures), (rewards, i)
            assert i not in peers and len(set(peers)) == len(peers), (rewards, i)
            assert set(peers) <= set(range(8)) and ctx.foreign_successes == ()


def test_random_peer_ignores_labels() -> None:
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    config = PeerConfig.named("2S1F", control="random_peer")
    contexts = [c for s in range(40) for c in select_peers(rewards, config, seed=s)]
    assert any(
        rewards[j] == 0.0 for c in contexts for j in c.successes
    )  # failure in a success slot
    assert any(rewards[j] == 1.0 for c in contexts for j in c.failures)


def test_unrelated_prompt_uses_only_other_groups_successes() -> None:
    rewards = _mixed_batch(6, 8, seed=1)
    config = PeerConfig.named("2S1F", control="unrelated_prompt")
    controlled = select_peers_batch(rewards, config, seed=2)
    base = select_peers_batch(rewards, replace(config, control="none"), seed=2)
    for u, (group, ref_group) in enumerate(zip(controlled, base, strict=True)):
        pool = {
            (g, j) for g, r in enumerate(rewards) if g != u for j, x in enumerate(r) if x >= 0.5
        }
        for ctx, ref in zip(group, ref_group, strict=True):
            assert ctx.successes == () and ctx.failures == ()
            assert set(ctx.foreign_successes) <= pool
            assert len(set(ctx.foreign_successes)) == len(ctx.foreign_successes)
            assert len(ctx.foreign_successes) == min(ref.n_blocks, len(pool))


def test_unrelated_prompt_fills_only_what_the_batch_has_and_reports_shortfall() -> None:
    rewards = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    config = PeerConfig.named("2S1F", control="unrelated_prompt")
    controlled = select_peers_batch(rewards, config, seed=0)
    # Group 1 has no success to lend: group 0 gets empty contexts (no distillation loss).
    assert controlled[0] == [PeerContext()] * 3
    # Group 1's failure-only contexts (one slot) each get one of group 0's two successes.
    assert all(len(c.foreign_successes) == 1 for c in controlled[1])
    assert all(c.foreign_successes[0] in {(0, 0), (0, 1)} for c in controlled[1])
    base = select_peers_batch(rewards, replace(config, control="none"), seed=0)
    assert control_shortfall_fraction(controlled, base) == 0.5


@pytest.mark.parametrize("name", ["1F", "1S1F", "2S1F"])
def test_success_only_matched_replaces_failures_by_spare_successes(name: str) -> None:
    config = PeerConfig.named(name, control="success_only_matched")
    plain = replace(config, control="none")
    for rewards in PATTERNS_8:
        base = select_peers(rewards, plain, seed=6)
        for i, (ctx, ref) in enumerate(
            zip(select_peers(rewards, config, seed=6), base, strict=True)
        ):
            n_shown = len(ref.successes)
            spare = [j for j in range(8) if rewards[j] == 1.0 and j != i and j not in ref.successes]
            assert ctx.failures == (), (rewards, i)
            assert ctx.successes[:n_shown] == ref.successes, (rewards, i)
            extra = ctx.successes[n_shown:]
            assert set(extra) <= set(spare) and len(set(extra)) == len(extra), (rewards, i)
            assert len(extra) == min(len(ref.failures), len(spare)), (rewards, i)


def test_success_only_matched_leaves_slot_empty_without_spare_success() -> None:
    rewards = [1.0, 1.0, 1.0, 0.0]
    config = PeerConfig.named("2S1F", control="success_only_matched", policy="first")
    contexts = select_peers(rewards, config, seed=0)
    assert contexts == [
        PeerContext(successes=(1, 2)),  # its failure slot had no spare success to take
        PeerContext(successes=(0, 2)),
        PeerContext(successes=(0, 1)),
        PeerContext(successes=(0, 1)),  # the lone failure had no failure slot to replace
    ]
    base = select_peers(rewards, replace(config, control="none"), seed=0)
    assert control_shortfall_fraction([contexts], [base]) == 0.75


@pytest.mark.parametrize("control", ["random_peer", "unrelated_prompt", "success_only_matched"])
def test_token_matching_reaches_budget_by_at_most_one_peer(control: str) -> None:
    rng = random.Random(control)
    rewards = _mixed_batch(8, 8, seed=3)
    lengths = [[rng.randint(1, 60) for _ in range(8)] for _ in range(8)]
    config = PeerConfig.named("2S1F", control=control, control_match="token")
    controlled = select_peers_batch(rewards, config, seed=7, lengths_per_group=lengths)
    base = select_peers_batch(
        rewards, replace(config, control="none"), seed=7, lengths_per_group=lengths
    )
    for u, i in itertools.product(range(8), range(8)):
        ctx, ref, tok = controlled[u][i], base[u][i], lengths[u]
        where = f"group {u} rollout {i}"
        if control == "random_peer":
            budget = sum(tok[j] for j in ref.successes + ref.failures)
            peers = list(ctx.successes + ctx.failures)
            assert i not in peers and len(set(peers)) == len(peers), where
            _budget_check([tok[j] for j in peers], budget, 7, where)
        elif control == "unrelated_prompt":
            budget = sum(tok[j] for j in ref.successes + ref.failures)
            pool = sum(x >= 0.5 for g, r in enumerate(rewards) if g != u for x in r)
            foreign = [lengths[g][j] for g, j in ctx.foreign_successes]
            _budget_check(foreign, budget, pool, where)
        else:
            budget = sum(tok[j] for j in ref.failures)
            extra = list(ctx.successes[len(ref.successes) :])
            spare = [j for j in range(8) if rewards[u][j] == 1.0 and j != i]
            assert ctx.failures == () and ctx.successes[: len(ref.successes)] == ref.successes
            _budget_check([tok[j] for j in extra], budget, len(spare) - len(ref.successes), where)


def test_token_matching_needs_lengths() -> None:
    config = PeerConfig.named("2S1F", control="random_peer", control_match="token")
    with pytest.raises(ValueError, match="control_match='token' needs lengths"):
        select_peers([1.0, 0.0, 1.0], config, seed=0)
    with pytest.raises(ValueError, match="group 0: control_match='token' needs lengths"):
        select_peers_batch([[1.0, 0.0]], replace(config, control="unrelated_prompt"), seed=0)


def test_block_matching_ignores_lengths() -> None:
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0]
    config = PeerConfig.named("2S1F", control="random_peer")
    assert select_peers(rewards, config, seed=1, lengths=[5, 80, 1, 9, 3]) == select_peers(
        rewards, config, seed=1
    )


@pytest.mark.parametrize("control", ["random_peer", "success_only_matched"])
def test_in_group_controls_in_batch_equal_per_group_selection(control: str) -> None:
    rewards = _mixed_batch(4, 6, seed=8)
    config = PeerConfig.named("2S1F", control=control)
    batch = select_peers_batch(rewards, config, seed=5)
    assert batch == [select_peers(r, config, seed=group_seed(5, u)) for u, r in enumerate(rewards)]
    assert batch == select_peers_batch(rewards, config, seed=5)


@pytest.mark.parametrize("control", ["random_peer", "unrelated_prompt", "success_only_matched"])
def test_controls_keep_the_feedback_block(control: str) -> None:
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    feedback = [[True, True, False, True], [True, False, True, True]]
    config = PeerConfig.named("1F", include_feedback=True, control=control)
    for cfg in (config, replace(config, control="none")):
        contexts = select_peers_batch(rewards, cfg, seed=0, feedback_available_per_group=feedback)
        assert [[c.use_feedback for c in g] for g in contexts] == feedback, cfg.control


def test_shortfall_fraction_in_tokens_hand_computed() -> None:
    lengths = [[10, 20, 30], [5, 5, 5]]
    uncontrolled = [[PeerContext(successes=(1,)), PeerContext(failures=(2,)), PeerContext()]]
    uncontrolled.append([PeerContext(successes=(0, 1))] * 3)
    controlled = [
        [PeerContext(successes=(2,)), PeerContext(foreign_successes=((1, 0),)), PeerContext()],
        [PeerContext(failures=(2,)), PeerContext(successes=(0, 2)), PeerContext()],
    ]
    # Short in tokens: rollouts (0, 1): 5 < 30, (1, 0): 5 < 10, (1, 2): 0 < 10.
    assert control_shortfall_fraction(controlled, uncontrolled, lengths_per_group=lengths) == 0.5
    # In blocks: (1, 0) and (1, 2) have fewer peers.
    assert control_shortfall_fraction(controlled, uncontrolled) == pytest.approx(2 / 6)
