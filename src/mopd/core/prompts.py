"""Teacher-prompt text and token-budget fitting.

The teacher reads the original question followed by one block per peer: successes first
(the first under "Correct solution:", later ones under "Another successful solution:"),
then failures, then the rollout's own verifier feedback, and a closing instruction::

    <question>
    Correct solution:

    <success peer 1>
    Another successful solution:

    <success peer 2>
    A known failed solution (avoid repeating this mistake):

    <failed peer>

    Correctly solve the original question.

With no block at all the teacher prompt is the plain question, unchanged. Peer texts are
inserted verbatim (no stripping), so the output is predictable from the inputs.

Layouts (``teacher.layout``), each rendered as chat turns (:func:`render_teacher_turns`):

* ``paper``: the layout above, one user turn (the paper's and the reference code's).
* ``multi-turn``: the question as a user turn, then every peer as an earlier *assistant*
  turn, each followed by a user turn with its verdict and the question again::

      user: <question>
      assistant: <success peer 1>
      user: That answer is correct.\n\nSolve the question again:\n\n<question>
      assistant: <failed peer>
      user: That answer is wrong. ...\n\nSolve the question again:\n\n<question>

  The chat template closes each peer with its end-of-turn marker, so a peer ends the way
  a response ends. In the paper layout a peer answer is followed by a newline and the
  next header, and a small conditioned teacher learns "answer, then continue": it lowers
  P(end-of-turn) after a complete answer, which pushes the student to longer responses.
* ``summaries``: the reference code's summaries variant: every peer is condensed to the
  text of its ``<summary>...</summary>`` tag, or its first 300 characters when it has
  none (:func:`peer_summary`), under "Summary of a(n) (un)successful solution:" headers.

Budget fitting (deviation from the reference code). The reference truncates an over-long
teacher prompt from the right, which removes the closing instruction and, after the chat
template, the assistant header. Here the question and the instruction are never cut;
instead peer texts are shortened in a fixed priority order -- failures (last first), then
successes (last first, so the first success goes last), then the feedback. A shortened
peer keeps its beginning followed by a marker (``"[...]"``); the kept character count is
found by binary search, so each slot costs O(log len) calls of ``count_tokens``. A slot
that cannot keep even one character is dropped together with its header. If no block can
fit, the result is the plain question and ``has_context`` is False: the caller must then
treat the rollout as having no context (no distillation loss).

Pure standard library: the token counter is a callable supplied by the caller (it should
measure the whole rendered prompt, chat-template overhead included).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from mopd.core.fields import opt

SlotKind = Literal["success", "failure", "feedback"]
Turn = tuple[str, str]  # (role, content) of one chat message
LAYOUTS = ("paper", "multi-turn", "summaries")
SUMMARY_FALLBACK_CHARS = 300  # the reference code's fallback when a peer has no summary tag
_SUMMARY = re.compile(r"<summary>(.*?)</summary>", re.DOTALL)


@dataclass(frozen=True)
class TeacherTemplates:
    """Text pieces of the teacher prompt; the defaults give the layout of the module docstring.

    Rendered as ``question + question_suffix + blocks + instruction`` where each block is
    ``header + peer_text + block_suffix``. Without any block only ``question`` is returned.
    """

    question_suffix: str = opt("\n", "text after the question (paper layout)")
    success_header: str = opt("Correct solution:\n\n", "header of the first successful peer")
    extra_success_header: str = opt(
        "Another successful solution:\n\n", "header of further successful peers"
    )
    failure_header: str = opt(
        "A known failed solution (avoid repeating this mistake):\n\n", "header of a failed peer"
    )
    feedback_header: str = opt(
        "Verifier feedback on an earlier attempt at this question:\n\n",
        "header of verifier feedback",
    )
    block_suffix: str = opt("\n", "text after each peer block")
    instruction: str = opt(
        "\nCorrectly solve the original question.", "closing instruction of the teacher prompt"
    )
    success_verdict: str = opt(
        "That answer is correct.", "multi-turn: user turn after a successful peer"
    )
    failure_verdict: str = opt(
        "That answer is wrong. Avoid repeating this mistake.",
        "multi-turn: user turn after a failed peer",
    )
    retry: str = opt(
        "\n\nSolve the question again:\n\n",
        "multi-turn: text between the verdict and the question again",
    )
    summary_success_header: str = opt(
        "Summary of a successful solution:\n\n", "summaries: header of a condensed success"
    )
    summary_failure_header: str = opt(
        "Summary of an unsuccessful solution:\n\n", "summaries: header of a condensed failure"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise TypeError(
                    f"TeacherTemplates.{f.name} must be a str, got {type(value).__name__}"
                )


DEFAULT_TEMPLATES = TeacherTemplates()


def render_teacher_prompt(
    question: str,
    successes: Sequence[str],
    failures: Sequence[str],
    feedback: str | None = None,
    templates: TeacherTemplates = DEFAULT_TEMPLATES,
) -> str:
    """Teacher-prompt text for one rollout; the plain ``question`` when there is no block.

    ``successes`` and ``failures`` are peer texts in display order; ``feedback`` (None = no
    block) is the rollout's own verifier feedback, shown after the failures.
    """
    t = templates
    blocks: list[str] = []
    for i, text in enumerate(successes):
        header = t.success_header if i == 0 else t.extra_success_header
        blocks.append(header + text + t.block_suffix)
    blocks.extend(t.failure_header + text + t.block_suffix for text in failures)
    if feedback is not None:
        blocks.append(t.feedback_header + feedback + t.block_suffix)
    if not blocks:
        return question
    return question + t.question_suffix + "".join(blocks) + t.instruction


def peer_summary(text: str) -> str:
    """The text inside a peer's first ``<summary>`` tag, else its first 300 characters."""
    found = _SUMMARY.search(text)
    return found.group(1).strip() if found else text[:SUMMARY_FALLBACK_CHARS]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def render_teacher_turns(
    question: str,
    successes: Sequence[str],
    failures: Sequence[str],
    feedback: str | None = None,
    templates: TeacherTemplates = DEFAULT_TEMPLATES,
    layout: str = "paper",
) -> tuple[Turn, ...]:
    """The teacher's chat turns for one rollout under `layout` (module docstring).

    Peer texts are used as given (``summaries`` expects them condensed already, see
    :func:`fit_teacher_prompt`). Without any block: the plain question as one user turn.
    """
    _check_layout(layout)
    t = templates
    if layout == "summaries":
        t = replace(
            t,
            success_header=t.summary_success_header,
            extra_success_header=t.summary_success_header,
            failure_header=t.summary_failure_header,
        )
    peers = [(text, t.success_verdict) for text in successes]
    peers += [(text, t.failure_verdict) for text in failures]
    if layout != "multi-turn" or not peers:
        return (("user", render_teacher_prompt(question, successes, failures, feedback, t)),)
    turns: list[Turn] = [("user", question)]
    for i, (text, verdict) in enumerate(peers):
        turns.append(("assistant", text))
        own = ""
        if feedback is not None and i == len(peers) - 1:
            own = "\n\n" + t.feedback_header + feedback
        turns.append(("user", verdict + own + t.retry + question))
    return tuple(turns)


def turns_text(turns: Sequence[Turn]) -> str:
    """Readable text of a teacher prompt: a single turn's content, else ``[role]`` blocks."""
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"[{role}]\n{content}" for role, content in turns)


@dataclass(frozen=True)
class SlotCut:
    """One peer text shortened (or dropped) to fit the budget.

    ``index`` is the position among peers of the same ``kind`` in display order (0 for the
    feedback). ``chars_removed`` counts characters of the original text (marker excluded).
    """

    kind: SlotKind
    index: int
    chars_removed: int
    dropped: bool


@dataclass(frozen=True)
class FittedPrompt:
    """Result of `fit_teacher_prompt`.

    - ``text``/``n_tokens``: the prompt and its ``count_tokens`` value.
    - ``truncated``: some peer text was shortened or dropped.
    - ``fits``: ``n_tokens <= max_tokens``; False only when even the plain question is over.
    - ``has_context``: at least one block survived. False means the text is the plain
      question and the rollout must be treated as having no context.
    - ``cuts``: the shortened / dropped slots, in the order they were cut.
    - ``turns``: the prompt as chat turns (one user turn except in the multi-turn layout).
    """

    text: str
    n_tokens: int
    truncated: bool
    fits: bool
    has_context: bool
    cuts: tuple[SlotCut, ...] = ()
    turns: tuple[Turn, ...] = field(default=(), compare=False)  # the chat turns of `text`

    @property
    def n_dropped(self) -> int:
        return sum(cut.dropped for cut in self.cuts)


@dataclass
class _Slot:
    kind: SlotKind
    index: int
    original: str
    text: str | None  # None: dropped with its header


def _render_slots(
    question: str, slots: list[_Slot], templates: TeacherTemplates, layout: str
) -> tuple[Turn, ...]:
    kept = [s for s in slots if s.text is not None]
    feedback = [s.text for s in kept if s.kind == "feedback"]
    return render_teacher_turns(
        question,
        [s.text for s in kept if s.kind == "success" and s.text is not None],
        [s.text for s in kept if s.kind == "failure" and s.text is not None],
        feedback[0] if feedback else None,
        templates,
        layout,
    )


def _skeleton(question: str, templates: TeacherTemplates, layout: str) -> tuple[Turn, ...]:
    """What every block-carrying prompt contains: question, separator and instruction
    (multi-turn: one empty peer with its verdict turn)."""
    if layout == "multi-turn":
        return render_teacher_turns(question, [""], [], None, templates, layout)
    return (("user", question + templates.question_suffix + templates.instruction),)


def fit_teacher_prompt(
    question: str,
    successes: Sequence[str],
    failures: Sequence[str],
    feedback: str | None = None,
    *,
    count_tokens: Callable[[tuple[Turn, ...]], int],
    max_tokens: int,
    templates: TeacherTemplates = DEFAULT_TEMPLATES,
    marker: str = "[...]",
    layout: str = "paper",
) -> FittedPrompt:
    """Render the teacher prompt, shortening peer texts until ``count_tokens(turns) <= max_tokens``.

    Cut order: failures (last first), successes (last first), feedback; a prompt that
    already fits is returned unchanged. See the module docstring for the algorithm.
    `count_tokens` measures the rendered chat turns (:func:`render_teacher_turns`).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    _check_layout(layout)
    if layout == "summaries":
        successes = [peer_summary(text) for text in successes]
        failures = [peer_summary(text) for text in failures]

    full = render_teacher_turns(question, successes, failures, feedback, templates, layout)
    n_full = count_tokens(full)
    n_blocks = len(successes) + len(failures) + int(feedback is not None)
    if n_full <= max_tokens or n_blocks == 0:
        # Nothing to cut: either it fits, or it is the plain question and cannot be shortened.
        return FittedPrompt(
            turns_text(full),
            n_full,
            truncated=False,
            fits=n_full <= max_tokens,
            has_context=n_blocks > 0,
            turns=full,
        )

    slots = [_Slot("success", i, s, s) for i, s in enumerate(successes)]
    slots += [_Slot("failure", i, s, s) for i, s in enumerate(failures)]
    if feedback is not None:
        slots.append(_Slot("feedback", 0, feedback, feedback))
    # Dropping an earlier success before a later one would re-label the later one as
    # "Correct solution:"; this order only ever drops from the end of each kind.
    order = [s for s in reversed(slots) if s.kind == "failure"]
    order += [s for s in reversed(slots) if s.kind == "success"]
    order += [s for s in slots if s.kind == "feedback"]

    # Every block-carrying prompt contains question, separator and instruction: when those
    # alone are over budget no amount of peer cutting helps.
    hopeless = count_tokens(_skeleton(question, templates, layout)) > max_tokens

    cuts: list[SlotCut] = []
    n_tokens = n_full
    for slot in order:
        if n_tokens <= max_tokens:
            break
        slot.text = None
        if hopeless:
            cuts.append(SlotCut(slot.kind, slot.index, len(slot.original), dropped=True))
            continue
        n_dropped = count_tokens(_render_slots(question, slots, templates, layout))
        # Invariant: keeping `lo` characters fits (lo = 0 means dropped), keeping `hi` does
        # not (the full text did not fit, and the marker only adds length).
        lo, hi, n_lo = 0, len(slot.original), n_dropped
        if n_dropped <= max_tokens:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                slot.text = slot.original[:mid] + marker
                n_mid = count_tokens(_render_slots(question, slots, templates, layout))
                if n_mid <= max_tokens:
                    lo, n_lo = mid, n_mid
                else:
                    hi = mid
        slot.text = slot.original[:lo] + marker if lo > 0 else None
        n_tokens = n_lo
        cuts.append(
            SlotCut(slot.kind, slot.index, len(slot.original) - lo, dropped=slot.text is None)
        )

    turns = _render_slots(question, slots, templates, layout)
    has_context = any(s.text is not None for s in slots)
    if hopeless:
        n_tokens = count_tokens(turns)
    return FittedPrompt(
        turns_text(turns),
        n_tokens,
        truncated=True,
        fits=n_tokens <= max_tokens,
        has_context=has_context,
        cuts=tuple(cuts),
        turns=turns,
    )
