"""Teacher inputs for a batch of scored rollout groups.

Connects the pure pieces (``core.peers`` decides who is shown, ``core.prompts`` renders
and fits the text) to a tokenizer: the rendered teacher text replaces the content of the
problem's last user message, and the result goes through the tokenizer's own chat template
with the generation prompt, so teacher and student read the same conversation format.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mopd.core.peer_controls import control_shortfall_fraction
from mopd.core.peers import PeerConfig, context_stats, select_peers_batch
from mopd.core.prompts import TeacherTemplates, Turn, fit_teacher_prompt
from mopd.types import PeerContext, Problem, Rollout, Verdict


@dataclass(frozen=True)
class TeacherInput:
    """What the teacher reads for one rollout."""

    prompt_ids: tuple[int, ...]  # chat-templated teacher prompt, generation header included
    context: PeerContext
    has_context: bool  # False: plain question, the rollout gets no distillation loss
    truncated: bool  # peers were shortened to fit the token budget
    text: str
    # Contrastive credit: the teacher prompt with ONE success peer, and the same prompt with
    # one failed peer in its place (shown as a success); None without both peers.
    contrast_ids: tuple[tuple[int, ...], tuple[int, ...]] | None = None


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a chat conversation followed by the assistant generation header."""
    out = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True
    )
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):  # BatchEncoding in transformers 5
        out = out["input_ids"]
    return list(out)


def _with_turns(problem: Problem, turns: Sequence[Turn]) -> list[dict[str, str]]:
    """The problem's messages with its last user message replaced by the teacher's turns."""
    messages = [dict(m) for m in problem.messages]
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            teacher = [{"role": role, "content": content} for role, content in turns]
            return [*messages[:i], *teacher, *messages[i + 1 :]]
    raise ValueError(f"problem {problem.id!r} has no user message")


def _with_question(problem: Problem, text: str) -> list[dict[str, str]]:
    """The problem's messages with the last user message's content replaced by `text`."""
    return _with_turns(problem, [("user", text)])


class _TokenCounter:
    """Counts chat-templated prompt tokens of teacher turns.

    A single user turn: template overhead once, then the content alone, which avoids
    re-rendering the template for every probe of the budget search (the content sits
    between special tokens, so its tokenisation does not merge with the surroundings).
    Several turns (multi-turn layout): the whole templated prompt.
    """

    def __init__(self, tokenizer: Any, problem: Problem) -> None:
        self.tokenizer, self.problem = tokenizer, problem
        self.overhead = len(chat_prompt_ids(tokenizer, _with_question(problem, "")))

    def __call__(self, turns: Sequence[Turn]) -> int:
        if len(turns) == 1 and turns[0][0] == "user":
            text = turns[0][1]
            return self.overhead + len(self.tokenizer.encode(text, add_special_tokens=False))
        return len(chat_prompt_ids(self.tokenizer, _with_turns(self.problem, turns)))


def _one_peer_ids(
    tokenizer: Any,
    problem: Problem,
    counter: _TokenCounter,
    max_tokens: int,
    templates: TeacherTemplates,
    layout: str,
    peer: str,
) -> tuple[int, ...]:
    """Teacher prompt ids showing `peer` alone, under the success header."""
    fitted = fit_teacher_prompt(
        problem.question,
        [peer],
        [],
        None,
        count_tokens=counter,
        max_tokens=max_tokens,
        templates=templates,
        layout=layout,
    )
    return tuple(chat_prompt_ids(tokenizer, _with_turns(problem, fitted.turns)))


def build_teacher_inputs(
    tokenizer: Any,
    problems: Sequence[Problem],
    groups: Sequence[Sequence[Rollout]],
    verdicts: Sequence[Sequence[Verdict]],
    *,
    peers: PeerConfig,
    templates: TeacherTemplates,
    max_prompt_tokens: int,
    use_context: bool,
    seed: int,
    layout: str = "paper",
    contrast: bool = False,
) -> list[list[TeacherInput]]:
    """Teacher prompt ids for every rollout, grouped like `groups` (`layout`: see
    `core.prompts`). `contrast`: also the two one-peer prompts of `TeacherInput.contrast_ids`
    (the context's first success and first failure, each under the success header).

    With `use_context=False` (standard OPD) the teacher sees only the question and every
    rollout counts as having a context (it gets the loss).
    """
    if not use_context:
        out = []
        for problem, group in zip(problems, groups, strict=True):
            ids = tuple(chat_prompt_ids(tokenizer, problem.messages))
            plain = TeacherInput(ids, PeerContext(), True, False, problem.question)
            out.append([plain] * len(group))
        return out

    rewards = [[v.reward for v in vs] for vs in verdicts]
    lengths = [[len(r.response_ids) for r in group] for group in groups]
    feedback = [[bool(v.feedback) for v in vs] for vs in verdicts]
    contexts = select_peers_batch(
        rewards,
        peers,
        seed=seed,
        lengths_per_group=lengths,
        feedback_available_per_group=feedback,
    )
    result: list[list[TeacherInput]] = []
    for problem, group, group_verdicts, group_contexts in zip(
        problems, groups, verdicts, contexts, strict=True
    ):
        counter = _TokenCounter(tokenizer, problem)
        row: list[TeacherInput] = []
        for i, ctx in enumerate(group_contexts):
            successes = [group[j].text for j in ctx.successes]
            successes += [groups[g][j].text for g, j in ctx.foreign_successes]
            failures = [group[j].text for j in ctx.failures]
            own_feedback = group_verdicts[i].feedback if ctx.use_feedback else None
            fitted = fit_teacher_prompt(
                problem.question,
                successes,
                failures,
                own_feedback,
                count_tokens=counter,
                max_tokens=max_prompt_tokens,
                templates=templates,
                layout=layout,
            )
            has_context = not ctx.is_empty and fitted.has_context
            ids = tuple(chat_prompt_ids(tokenizer, _with_turns(problem, fitted.turns)))
            pair = None
            if contrast and successes and failures:  # the same form: only correctness differs
                one_peer = functools.partial(
                    _one_peer_ids, tokenizer, problem, counter, max_prompt_tokens, templates, layout
                )
                pair = (one_peer(successes[0]), one_peer(failures[0]))
            row.append(TeacherInput(ids, ctx, has_context, fitted.truncated, fitted.text, pair))
        result.append(row)
    return result


def context_sums(
    inputs: Sequence[Sequence[TeacherInput]],
    groups: Sequence[Sequence[Rollout]],
    verdicts: Sequence[Sequence[Verdict]],
    *,
    peers: PeerConfig,
    seed: int,
) -> dict[str, float]:
    """What the peer contexts of a batch held, as sums over its rollouts (``rollouts`` the
    count), so that batches of several processes add up before the means are taken.

    The `core.peers.context_stats` statistics (peers shown per rollout, feedback share)
    and, under a peer control, ``control_shortfall``: rollouts whose controlled context
    fell short of its uncontrolled budget (re-selected with the same seed).
    """
    contexts = [[t.context for t in group] for group in inputs]
    n = sum(len(group) for group in contexts)
    sums = {key: value * n for key, value in context_stats(contexts).items()}
    sums["rollouts"] = float(n)
    if peers.control != "none":
        rewards = [[v.reward for v in vs] for vs in verdicts]
        lengths = [[len(r.response_ids) for r in group] for group in groups]
        uncontrolled = select_peers_batch(
            rewards,
            replace(peers, control="none"),
            seed=seed,
            lengths_per_group=lengths,
            feedback_available_per_group=[[bool(v.feedback) for v in vs] for vs in verdicts],
        )
        token = peers.control_match == "token"
        short = control_shortfall_fraction(
            contexts, uncontrolled, lengths_per_group=lengths if token else None
        )
        sums["control_shortfall"] = short * n
    return sums
