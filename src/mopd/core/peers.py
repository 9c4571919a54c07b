"""Peer selection: which rollouts of the same prompt go into each rollout's teacher context.

For rollout i of a group of G rollouts with rewards r_G:

- S = {j : r_j >= success_threshold} (successes), F = the rest (failures).
- Success peers: min(n_success, |S'|) elements of S' = S \\ {i} (or S itself when
  `exclude_self=False`, the reference's `dont_reprompt_on_self_success` switched off).
- Failure peers: drawn from F \\ {i} (a rollout never sees itself as a failure).
  `failure_condition="always"` shows min(n_failure, |F \\ {i}|) of them;
  `"when_no_solution"` shows them only when this context shows no success (so with
  `n_success=0`, as in 1F, they are always shown).
- Feedback: the rollout's own verifier feedback is shown when `include_feedback`, it is
  available for i, and (unless `feedback_only_without_success=False`) no success is shown.

A rollout whose context stays empty is trained on the plain question: it gets no
distillation loss, and `context_stats` reports how often that happens.

Selection policy (a deliberate deviation from the reference code): the reference takes
"the first" success of a batch that was sorted by response length, which quietly makes
the demonstration the shortest (or longest) success, and it draws the failure with an
unseeded `random.choice`, so runs are not reproducible. Here `policy` makes the choice
explicit: `"random"` (default) draws uniformly without replacement from a seeded
generator and shows peers in draw order; `"first"` takes peers in group order; `"shortest"` takes the shortest
responses (ties by index) and so reproduces the reference's length bias on purpose.

Seeding: `select_peers` receives the group's seed; rollout i draws from
`random.Random(derive_seed(seed, "peers", i))`, and the controls from a separate stream
`derive_seed(seed, "control", i)`. `derive_seed` hashes its arguments with BLAKE2b
(stable across processes, unlike `hash`). `select_peers_batch` gives group u the seed
`group_seed(seed, u) = derive_seed(seed, "group", u)`, so groups draw independently and
(seed, u) pairs of different steps do not collide the way `seed + u` would. The same
rewards, config and seed always give the same contexts.

Matched-budget controls (`random_peer`, `unrelated_prompt`, `success_only_matched`) are
implemented in `mopd.core.peer_controls`; they start from the uncontrolled context built
here with the same seed.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

from mopd.core.fields import opt
from mopd.core.peer_controls import (
    control_shortfall_fraction,
    random_peer_context,
    success_only_context,
    unrelated_prompt_context,
)
from mopd.core.seeding import derive_seed
from mopd.types import PeerContext

__all__ = [
    "NAMED_CONTEXTS",
    "PeerConfig",
    "context_stats",
    "control_shortfall_fraction",
    "group_seed",
    "select_peers",
    "select_peers_batch",
]

MAX_PEERS = 8
FAILURE_CONDITIONS = ("always", "when_no_solution")
POLICIES = ("random", "first", "shortest")
CONTROLS = ("none", "random_peer", "unrelated_prompt", "success_only_matched")
CONTROL_MATCHES = ("block", "token")

# Named contexts of the paper -> (n_success, n_failure).
NAMED_CONTEXTS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"base": (0, 0), "1S": (1, 0), "2S": (2, 0), "1F": (0, 1), "1S1F": (1, 1), "2S1F": (2, 1)}
)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"PeerConfig.{name} must be one of {allowed}, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"PeerConfig.{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class PeerConfig:
    """How peer contexts are built; see the module docstring for the rules."""

    n_success: int = opt(2, "successful peers in the teacher's context")
    n_failure: int = opt(1, "failed peers in the teacher's context")
    failure_condition: Literal["always", "when_no_solution"] = opt(
        "always", "always, or when_no_solution (failures only if no success)"
    )
    exclude_self: bool = opt(True, "a rollout is never its own peer")
    policy: Literal["random", "first", "shortest"] = opt(
        "random", "which peers: random, first, shortest"
    )
    success_threshold: float = opt(0.5, "reward at or above which a rollout is a success")
    include_feedback: bool = opt(False, "show the verifier's feedback on a failed peer (SDPO)")
    feedback_only_without_success: bool = opt(True, "feedback only when the group has no success")
    control: Literal["none", "random_peer", "unrelated_prompt", "success_only_matched"] = opt(
        "none", "ablation: none, random_peer, unrelated_prompt, success_only_matched"
    )
    control_match: Literal["block", "token"] = opt(
        "block", "controls match the real context's length by block or token"
    )

    def __post_init__(self) -> None:
        for name in ("n_success", "n_failure"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PEERS:
                raise ValueError(
                    f"PeerConfig.{name} must be an int in 0..{MAX_PEERS}, got {value!r}"
                )
        _check_choice("failure_condition", self.failure_condition, FAILURE_CONDITIONS)
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("control", self.control, CONTROLS)
        _check_choice("control_match", self.control_match, CONTROL_MATCHES)
        for name in ("exclude_self", "include_feedback", "feedback_only_without_success"):
            _check_bool(name, getattr(self, name))
        t = self.success_threshold
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not math.isfinite(t)
            or not 0 < t <= 1
        ):
            raise ValueError(f"PeerConfig.success_threshold must be a number in (0, 1], got {t!r}")

    @classmethod
    def named(cls, name: str, **overrides: Any) -> PeerConfig:
        """Config of a named context (base, 1S, 2S, 1F, 1S1F, 2S1F; case-insensitive).

        `overrides` set any other field; the counts are fixed by the name.
        """
        by_lower = {key.lower(): key for key in NAMED_CONTEXTS}
        key = by_lower.get(name.lower())
        if key is None:
            raise ValueError(
                f"unknown named context {name!r}; choose one of {tuple(NAMED_CONTEXTS)}"
            )
        fixed = sorted({"n_success", "n_failure"} & overrides.keys())
        if fixed:
            raise ValueError(f"named context {key!r} fixes {fixed}; use PeerConfig(...) instead")
        n_success, n_failure = NAMED_CONTEXTS[key]
        return cls(n_success=n_success, n_failure=n_failure, **overrides)


def group_seed(seed: int, group_index: int) -> int:
    """The seed `select_peers_batch` passes to `select_peers` for group `group_index`."""
    return derive_seed(seed, "group", group_index)


def _pick(
    candidates: list[int],
    k: int,
    policy: str,
    rng: random.Random,
    lengths_G: Sequence[int] | None,
) -> tuple[int, ...]:
    """Choose min(k, len(candidates)) distinct candidates (given in group order) by `policy`."""
    k = min(k, len(candidates))
    if policy == "random":
        return tuple(rng.sample(candidates, k))
    if policy == "shortest":
        assert lengths_G is not None  # checked by _validate_group
        candidates = sorted(candidates, key=lambda j: (lengths_G[j], j))
    return tuple(candidates[:k])


def _uncontrolled_context(
    i: int,
    success_G: Sequence[bool],
    config: PeerConfig,
    rng: random.Random,
    lengths_G: Sequence[int] | None,
    feedback_G: Sequence[bool] | None,
) -> PeerContext:
    """Rollout i's context under the plain rules (module docstring)."""
    pool_s = [j for j, ok in enumerate(success_G) if ok and not (config.exclude_self and j == i)]
    pool_f = [j for j, ok in enumerate(success_G) if not ok and j != i]
    successes = _pick(pool_s, config.n_success, config.policy, rng, lengths_G)
    show_failures = config.failure_condition == "always" or not successes
    failures = (
        _pick(pool_f, config.n_failure, config.policy, rng, lengths_G) if show_failures else ()
    )
    use_feedback = (
        config.include_feedback
        and feedback_G is not None
        and bool(feedback_G[i])
        and not (config.feedback_only_without_success and successes)
    )
    return PeerContext(successes=successes, failures=failures, use_feedback=use_feedback)


def _needs_lengths(config: PeerConfig) -> bool:
    token_control = config.control != "none" and config.control_match == "token"
    return config.policy == "shortest" or token_control


def _validate_group(
    rewards: Sequence[float],
    config: PeerConfig,
    lengths: Sequence[int] | None,
    feedback_available: Sequence[bool] | None,
    where: str = "",
) -> None:
    for r in rewards:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r):
            raise ValueError(f"{where}rewards must be finite numbers, got {r!r}")
    if lengths is None:
        if _needs_lengths(config):
            reason = "policy='shortest'" if config.policy == "shortest" else "control_match='token'"
            raise ValueError(
                f"{where}{reason} needs lengths (response token count per rollout); "
                "pass them or choose another setting"
            )
    elif len(lengths) != len(rewards) or any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 for n in lengths
    ):
        raise ValueError(
            f"{where}lengths must hold one non-negative int per rollout ({len(rewards)}), "
            f"got {list(lengths)!r}"
        )
    if feedback_available is None:
        if config.include_feedback:
            raise ValueError(
                f"{where}include_feedback=True needs feedback_available (one bool per rollout)"
            )
    elif len(feedback_available) != len(rewards):
        raise ValueError(
            f"{where}feedback_available must hold one bool per rollout ({len(rewards)}), "
            f"got {len(feedback_available)}"
        )


def _contexts_without_validation(
    rewards: Sequence[float],
    config: PeerConfig,
    seed: int,
    lengths: Sequence[int] | None,
    feedback_available: Sequence[bool] | None,
) -> list[PeerContext]:
    success_G = [r >= config.success_threshold for r in rewards]
    contexts = [
        _uncontrolled_context(
            i,
            success_G,
            config,
            random.Random(derive_seed(seed, "peers", i)),
            lengths,
            feedback_available,
        )
        for i in range(len(rewards))
    ]
    if config.control == "none":
        return contexts
    token_lengths = lengths if config.control_match == "token" else None
    out = []
    for i, base in enumerate(contexts):
        rng = random.Random(derive_seed(seed, "control", i))
        if config.control == "random_peer":
            out.append(random_peer_context(base, i, len(rewards), rng, lengths_G=token_lengths))
        else:  # success_only_matched (unrelated_prompt is handled batch-wide)
            out.append(success_only_context(base, i, success_G, rng, lengths_G=token_lengths))
    return out


def select_peers(
    rewards: Sequence[float],
    config: PeerConfig,
    *,
    seed: int,
    lengths: Sequence[int] | None = None,
    feedback_available: Sequence[bool] | None = None,
) -> list[PeerContext]:
    """Peer contexts for the G rollouts of ONE group (same prompt), in group order.

    rewards: (G,) verifier rewards. lengths: (G,) response token counts, needed by
    `policy="shortest"` and token-matched controls. feedback_available: (G,) whether
    rollout j has verifier feedback text, needed when `include_feedback`.
    `unrelated_prompt` needs other groups: use `select_peers_batch`.
    """
    if config.control == "unrelated_prompt":
        raise ValueError(
            "control='unrelated_prompt' draws from other groups; use select_peers_batch"
        )
    _validate_group(rewards, config, lengths, feedback_available)
    return _contexts_without_validation(rewards, config, seed, lengths, feedback_available)


def _per_group(
    name: str, values: Sequence[Sequence[Any]] | None, n_groups: int
) -> list[Sequence[Any] | None]:
    if values is None:
        return [None] * n_groups
    if len(values) != n_groups:
        raise ValueError(f"{name} must have one entry per group ({n_groups}), got {len(values)}")
    return list(values)


def select_peers_batch(
    rewards_per_group: Sequence[Sequence[float]],
    config: PeerConfig,
    *,
    seed: int,
    lengths_per_group: Sequence[Sequence[int]] | None = None,
    feedback_available_per_group: Sequence[Sequence[bool]] | None = None,
) -> list[list[PeerContext]]:
    """Peer contexts for a batch of P groups: result[u][i] is rollout i of group u.

    Group u is handled as `select_peers(..., seed=group_seed(seed, u))`; for
    `unrelated_prompt` the uncontrolled contexts come from that same call with
    `control="none"`, and their slots are then filled with successes of the other groups.
    A second call with `control="none"` and the same seed reproduces those uncontrolled
    contexts, e.g. for `control_shortfall_fraction`.
    """
    n_groups = len(rewards_per_group)
    lengths_u = _per_group("lengths_per_group", lengths_per_group, n_groups)
    feedback_u = _per_group("feedback_available_per_group", feedback_available_per_group, n_groups)
    for u in range(n_groups):
        _validate_group(rewards_per_group[u], config, lengths_u[u], feedback_u[u], f"group {u}: ")

    plain = replace(config, control="none") if config.control == "unrelated_prompt" else config
    contexts = [
        _contexts_without_validation(
            rewards_per_group[u], plain, group_seed(seed, u), lengths_u[u], feedback_u[u]
        )
        for u in range(n_groups)
    ]
    if config.control != "unrelated_prompt":
        return contexts

    token = config.control_match == "token"
    successes_batch = [
        (u, j)
        for u, rewards in enumerate(rewards_per_group)
        for j, r in enumerate(rewards)
        if r >= config.success_threshold
    ]
    out = []
    for u, group in enumerate(contexts):
        pool = [(g, j) for g, j in successes_batch if g != u]
        out.append(
            [
                unrelated_prompt_context(
                    base,
                    pool,
                    random.Random(derive_seed(group_seed(seed, u), "control", i)),
                    lengths_G=lengths_u[u] if token else None,
                    lengths_per_group=lengths_per_group if token else None,
                )
                for i, base in enumerate(group)
            ]
        )
    return out


def context_stats(contexts_per_group: Sequence[Sequence[PeerContext]]) -> dict[str, float]:
    """Batch summary for metrics (names without namespace; the caller adds e.g. "teacher/").

    context_fraction: rollouts with a non-empty context (the others get no distillation
    loss); mean_successes / mean_failures / mean_foreign_successes: peers shown per
    rollout; feedback_fraction: rollouts shown their own feedback; mean_blocks: peer and
    feedback blocks per rollout. All 0.0 for an empty batch.
    """
    flat = [c for group in contexts_per_group for c in group]
    n = max(len(flat), 1)  # every sum is 0 for an empty batch
    return {
        "context_fraction": sum(not c.is_empty for c in flat) / n,
        "mean_successes": sum(len(c.successes) for c in flat) / n,
        "mean_failures": sum(len(c.failures) for c in flat) / n,
        "mean_foreign_successes": sum(len(c.foreign_successes) for c in flat) / n,
        "feedback_fraction": sum(c.use_feedback for c in flat) / n,
        "mean_blocks": sum(c.n_blocks for c in flat) / n,
    }
