"""Peer selection without controls: exhaustive invariants and named regressions."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from mopd.core.peers import (
    NAMED_CONTEXTS,
    PeerConfig,
    context_stats,
    group_seed,
    select_peers,
    select_peers_batch,
)
from mopd.types import PeerContext

pytestmark = pytest.mark.unit

NAMES = ("base", "1S", "2S", "1F", "1S1F", "2S1F")
PAPER_COUNTS = {
    "base": (0, 0),
    "1S": (1, 0),
    "2S": (2, 0),
    "1F": (0, 1),
    "1S1F": (1, 1),
    "2S1F": (2, 1),
}


def _lengths(group_size: int) -> list[int]:
    """Token counts with ties, so that `shortest` must break them by index."""
    return [(7 * j + 3) % 5 + 1 for j in range(group_size)]


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("policy", ["random", "first", "shortest"])
@pytest.mark.parametrize("condition", ["always", "when_no_solution"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
def test_contexts_obey_selection_rules_for_every_outcome_pattern(
    group_size: int, name: str, condition: str, policy: str, exclude_self: bool
) -> None:
    n_s, n_f = PAPER_COUNTS[name]
    config = PeerConfig.named(
        name, failure_condition=condition, policy=policy, exclude_self=exclude_self
    )
    lengths = _lengths(group_size)
    for pattern in itertools.product((0.0, 1.0), repeat=group_size):
        contexts = select_peers(list(pattern), config, seed=17, lengths=lengths)
        assert len(contexts) == group_size
        for i, ctx in enumerate(contexts):
            ok_s = [j for j in range(group_size) if pattern[j] == 1.0]
            ok_s = [j for j in ok_s if j != i] if exclude_self else ok_s
            ok_f = [j for j in range(group_size) if pattern[j] == 0.0 and j != i]
            want_s = min(n_s, len(ok_s))
            want_f = min(n_f, len(ok_f)) if condition == "always" or want_s == 0 else 0
            where = f"pattern={pattern} i={i}"
            assert set(ctx.successes) <= set(ok_s), where
            assert set(ctx.failures) <= set(ok_f), where
            assert len(set(ctx.successes)) == len(ctx.successes) == want_s, where
            assert len(set(ctx.failures)) == len(ctx.failures) == want_f, where
            assert ctx.foreign_successes == () and not ctx.use_feedback, where
            if policy == "first":
                assert ctx.successes == tuple(ok_s[:want_s]), where
                assert ctx.failures == tuple(ok_f[:want_f]), where
            elif policy == "shortest":
                # Every shown peer is at least as short as every candidate left out.
                for shown, pool in ((ctx.successes, ok_s), (ctx.failures, ok_f)):
                    left_out = [j for j in pool if j not in shown]
                    for a, b in itertools.product(shown, left_out):
                        assert (lengths[a], a) < (lengths[b], b), where


@pytest.mark.parametrize("condition", ["always", "when_no_solution"])
def test_group_without_success_gets_failure_only_context(condition: str) -> None:
    contexts = select_peers(
        [0.0] * 8, PeerConfig.named("2S1F", failure_condition=condition), seed=3
    )
    for i, ctx in enumerate(contexts):
        assert ctx.successes == ()
        assert len(ctx.failures) == 1 and ctx.failures[0] != i
        assert not ctx.is_empty


def test_lone_success_gets_no_success_peer() -> None:
    rewards = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    contexts = select_peers(rewards, PeerConfig.named("2S1F"), seed=0)
    assert contexts[3].successes == ()
    assert len(contexts[3].failures) == 1
    for i, ctx in enumerate(contexts):
        if i != 3:
            assert ctx.successes == (3,)  # the lone success is every failure's primary peer


@pytest.mark.parametrize("n_successes", range(9))
def test_primary_peer_needs_two_successes_for_a_success_and_one_for_a_failure(
    n_successes: int,
) -> None:
    rewards = [1.0] * n_successes + [0.0] * (8 - n_successes)
    for seed in range(5):
        contexts = select_peers(rewards, PeerConfig.named("1S"), seed=seed)
        for i, ctx in enumerate(contexts):
            has_primary = len(ctx.successes) == 1
            assert has_primary == (n_successes >= 2 if rewards[i] == 1.0 else n_successes >= 1)


def test_when_no_solution_hides_failure_once_a_success_is_shown() -> None:
    rewards = [1.0, 1.0, 0.0, 0.0]
    contexts = select_peers(
        rewards, PeerConfig.named("1S1F", failure_condition="when_no_solution"), seed=0
    )
    assert [ctx.failures for ctx in contexts[2:]] == [(), ()]
    assert [ctx.successes for ctx in contexts[:2]] == [(1,), (0,)]
    lone = select_peers(
        [1.0, 0.0, 0.0], PeerConfig.named("1S1F", failure_condition="when_no_solution"), seed=0
    )
    assert lone[0].successes == () and len(lone[0].failures) == 1


def test_same_seed_reproduces_contexts() -> None:
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    config = PeerConfig.named("2S1F")
    assert select_peers(rewards, config, seed=11) == select_peers(rewards, config, seed=11)


def test_different_seeds_can_give_different_contexts() -> None:
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    outcomes = {tuple(select_peers(rewards, PeerConfig.named("2S1F"), seed=s)) for s in range(10)}
    assert len(outcomes) > 1


def test_random_policy_draws_primary_peer_uniformly() -> None:
    # Rollout 0 of an all-success group: each of the 7 others should be primary ~1/7 of the time.
    counts = Counter(
        select_peers([1.0] * 8, PeerConfig.named("1S"), seed=s)[0].successes[0] for s in range(2800)
    )
    assert set(counts) == set(range(1, 8))
    assert all(abs(c - 400) < 80 for c in counts.values()), counts  # ~4.3 sigma each


def test_rollouts_of_a_group_draw_independently() -> None:
    # Rollouts 0 and 1 of an all-success group pick the same primary with probability
    # 6/49 ~ 0.12 when independent; a shared draw would make it 6/7.
    same = 0
    for s in range(500):
        contexts = select_peers([1.0] * 8, PeerConfig.named("1S"), seed=s)
        same += contexts[0].successes == contexts[1].successes
    assert 0.06 < same / 500 < 0.2


def test_random_policy_is_not_length_biased() -> None:
    # Same draw with any lengths: `random` must ignore them (the reference's length bias).
    rewards = [1.0] * 4 + [0.0] * 4
    config = PeerConfig.named("2S1F")
    assert select_peers(rewards, config, seed=5, lengths=[9, 1, 8, 2, 7, 3, 6, 4]) == select_peers(
        rewards, config, seed=5
    )


def test_shortest_policy_picks_shortest_with_index_tiebreak() -> None:
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    lengths = [50, 10, 30, 10, 40, 20, 60, 5]
    contexts = select_peers(
        rewards, PeerConfig.named("2S1F", policy="shortest"), seed=0, lengths=lengths
    )
    assert contexts[0] == PeerContext(successes=(1, 3), failures=(7,))
    assert contexts[1] == PeerContext(successes=(3, 2), failures=(7,))
    assert contexts[7] == PeerContext(successes=(1, 3), failures=(5,))


def test_first_policy_follows_group_order() -> None:
    rewards = [0.0, 1.0, 0.0, 1.0, 1.0]
    contexts = select_peers(rewards, PeerConfig.named("2S1F", policy="first"), seed=0)
    assert contexts[0] == PeerContext(successes=(1, 3), failures=(2,))
    assert contexts[3] == PeerContext(successes=(1, 4), failures=(0,))


def test_exclude_self_false_allows_self_among_successes_never_failures() -> None:
    config = PeerConfig.named("2S1F", policy="first", exclude_self=False)
    contexts = select_peers([1.0, 1.0, 0.0, 0.0], config, seed=0)
    assert contexts[1] == PeerContext(successes=(0, 1), failures=(2,))
    assert contexts[2] == PeerContext(successes=(0, 1), failures=(3,))
    drawn = [
        select_peers([1.0, 1.0, 1.0], PeerConfig.named("1S", exclude_self=False), seed=s)[0]
        for s in range(30)
    ]
    assert any(ctx.successes == (0,) for ctx in drawn)


@pytest.mark.parametrize(
    ("name", "only_without_success", "available", "want"),
    [
        # rewards [1, 1, 0, 0]: under 1S every rollout sees a success.
        ("1S", True, [True] * 4, [False] * 4),
        ("1S", False, [True] * 4, [True] * 4),
        ("1S", False, [True, False, True, False], [True, False, True, False]),
        ("1F", True, [True] * 4, [True] * 4),
        ("base", True, [False, True, False, True], [False, True, False, True]),
    ],
)
def test_feedback_shown_only_when_available_and_allowed(
    name: str, only_without_success: bool, available: list[bool], want: list[bool]
) -> None:
    config = PeerConfig.named(
        name, include_feedback=True, feedback_only_without_success=only_without_success
    )
    contexts = select_peers([1.0, 1.0, 0.0, 0.0], config, seed=0, feedback_available=available)
    assert [ctx.use_feedback for ctx in contexts] == want


def test_feedback_only_context_counts_as_nonempty_and_is_off_by_default() -> None:
    lone = select_peers(
        [1.0, 0.0],
        PeerConfig.named("1S", include_feedback=True),
        seed=0,
        feedback_available=[True, True],
    )
    assert lone[0] == PeerContext(use_feedback=True) and not lone[0].is_empty
    assert lone[1] == PeerContext(successes=(0,))
    plain = select_peers([1.0, 0.0], PeerConfig.named("1S"), seed=0, feedback_available=[True] * 2)
    assert not any(ctx.use_feedback for ctx in plain)


def test_threshold_half_reward_is_success_just_below_is_not() -> None:
    config = PeerConfig.named("1S1F", policy="first")
    contexts = select_peers([0.5, 0.49, 1.0], config, seed=0)
    assert contexts[2] == PeerContext(successes=(0,), failures=(1,))
    strict = select_peers([0.5, 0.49, 1.0], PeerConfig.named("1S1F", success_threshold=0.6), seed=0)
    assert strict[2].successes == () and set(strict[2].failures) <= {0, 1}


def test_batch_without_control_equals_per_group_selection_with_derived_seeds() -> None:
    rewards = [[1.0, 0.0, 1.0, 0.0], [0.0] * 4, [1.0, 1.0, 1.0, 0.0]]
    config = PeerConfig.named("2S1F")
    batch = select_peers_batch(rewards, config, seed=9)
    assert batch == [select_peers(r, config, seed=group_seed(9, u)) for u, r in enumerate(rewards)]


def test_identical_groups_draw_independently() -> None:
    rewards = [[1.0] * 6 + [0.0] * 2] * 2
    batches = [select_peers_batch(rewards, PeerConfig.named("2S1F"), seed=s) for s in range(5)]
    assert any(b[0] != b[1] for b in batches)


def test_group_seeds_do_not_collide_across_steps() -> None:
    # seed + group would make (step seed 1, group 0) equal to (step seed 0, group 1).
    seeds = {group_seed(s, u) for s, u in itertools.product(range(50), range(50))}
    assert len(seeds) == 2500


def test_context_stats_hand_computed() -> None:
    batch = [
        [PeerContext(successes=(1, 2), failures=(3,)), PeerContext()],
        [PeerContext(use_feedback=True), PeerContext(foreign_successes=((0, 1),))],
    ]
    stats = context_stats(batch)
    assert stats == {
        "context_fraction": 0.75,
        "mean_successes": 0.5,
        "mean_failures": 0.25,
        "mean_foreign_successes": 0.25,
        "feedback_fraction": 0.25,
        "mean_blocks": 1.25,
    }
    assert all(v == 0.0 for v in context_stats([]).values())


def test_named_contexts_match_paper_counts_and_take_overrides() -> None:
    assert dict(NAMED_CONTEXTS) == PAPER_COUNTS
    config = PeerConfig.named("2s1f", policy="first")
    assert (config.n_success, config.n_failure, config.policy) == (2, 1, "first")
    with pytest.raises(ValueError, match="unknown named context"):
        PeerConfig.named("3S")
    with pytest.raises(ValueError, match="n_success"):
        PeerConfig.named("1S", n_success=2)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_success", 9),
        ("n_success", -1),
        ("n_success", 1.0),
        ("n_failure", 9),
        ("n_failure", True),
        ("failure_condition", "never"),
        ("exclude_self", 1),
        ("policy", "longest"),
        ("success_threshold", 0.0),
        ("success_threshold", 1.5),
        ("success_threshold", math.nan),
        ("include_feedback", "yes"),
        ("feedback_only_without_success", None),
        ("control", "shuffle"),
        ("control_match", "bytes"),
    ],
)
def test_invalid_config_error_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"PeerConfig.{field}"):
        PeerConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rewards": [1.0, math.nan]}, "rewards"),
        ({"lengths": [3]}, "lengths"),
        ({"lengths": [3, -1]}, "lengths"),
        ({"config": PeerConfig(policy="shortest")}, "shortest.*lengths"),
        ({"config": PeerConfig(include_feedback=True)}, "feedback_available"),
        (
            {"config": PeerConfig(include_feedback=True), "feedback_available": [True]},
            "feedback_available",
        ),
        ({"config": PeerConfig(control="unrelated_prompt")}, "select_peers_batch"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs: dict, match: str) -> None:
    args = {"rewards": [1.0, 0.0], "config": PeerConfig(), "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        select_peers(**args)
