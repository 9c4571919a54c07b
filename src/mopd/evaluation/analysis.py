"""Teacher-signal analysis (method section 8): does a context make the teacher agree with the verifier?

For each prompt we hold G verified rollouts (sampled here, or read back from a run's
rollout file). For every context *condition* (base, 1S, 2S, 1F, 1S1F, 2S1F and the
matched controls ``random_peer``, ``unrelated_prompt``, ``success_only_matched``) each
rollout gets its own teacher prompt, built for that rollout by the training code
(:func:`mopd.collect.contexts.build_teacher_inputs`, so the exclusion rules, the peer
policy and the token budget are exactly those of training). The teacher then scores the
rollout's response tokens:

- ``score``: mean per-token log-prob of the response under the teacher (the paper's score);
- ``score_sum``: the summed log-prob;
- ``gap``: per-token teacher-minus-student log-prob, the student reading the plain prompt.

Next to the ranking metrics, diagnostics that say whether a context would mislead the
student if it were distilled: P(end-of-turn) at the last token of complete successes
(teacher vs. student: a teacher that lowers it teaches the student to run on), the mean
teacher-minus-student entropy per token, and the mean log-prob gap on successes and on
failures (a good context raises successes relative to failures), and that gap at the
first token of successes (a teacher that doubts how successes open, e.g. one that would
rather begin with an explanation than with the answer, pushes the student's openings
elsewhere even when the mean gap looks small). Conditions can be
scored under several teacher layouts (`core.prompts`); ``2S1F@multi-turn`` names the
2S1F condition in the multi-turn layout, a bare name the paper layout.

The per-prompt ranking metrics and their prompt-level bootstrap CIs come from
:mod:`mopd.evaluation.signal`. A condition may not be fully buildable for a rollout (a
success with no other success has no 2S context): such a rollout is scored with the
context as built (possibly the plain question), and ``built_fraction`` reports the share
of rollouts whose context has exactly the requested peer count. Controls are matched to
the ``control_base`` condition (2S1F by default); for them "built" means the full block
count of that base was filled.

Identical (prompt, response) pairs are scored once per model: the base condition and
empty contexts reuse the student's forward when the teacher is the student itself.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mopd.collect.contexts import TeacherInput, build_teacher_inputs, chat_prompt_ids
from mopd.collect.sampling import regroup, sample_and_verify_groups
from mopd.core.losses import token_entropy, token_logprobs
from mopd.core.peers import CONTROLS, NAMED_CONTEXTS, PeerConfig
from mopd.core.prompts import TeacherTemplates
from mopd.evaluation.signal import SIGNAL_METRICS, MetricSummary, summarize_signal
from mopd.models.scoring import build_scoring_batch, response_logits
from mopd.rollout.base import sampling_bar
from mopd.types import PeerContext, Problem, Rollout, Verdict

DEFAULT_CONDITIONS = (*NAMED_CONTEXTS, "random_peer", "unrelated_prompt")
_CONTROL_NAMES = tuple(c for c in CONTROLS if c != "none")


def condition_config(
    name: str, *, control_base: str = "2S1F", policy: str = "random", threshold: float = 0.5
) -> PeerConfig:
    """Peer config of condition `name`: a named context, or a control matched to `control_base`."""
    common: dict[str, Any] = {"policy": policy, "success_threshold": threshold}
    if name in _CONTROL_NAMES:
        return PeerConfig.named(control_base, control=name, **common)
    if name.lower() in {key.lower() for key in NAMED_CONTEXTS}:
        return PeerConfig.named(name, **common)
    allowed = ", ".join((*NAMED_CONTEXTS, *_CONTROL_NAMES))
    raise ValueError(f"unknown condition {name!r}; choose from: {allowed}")


def is_built(context: PeerContext, config: PeerConfig) -> bool:
    """Whether `context` holds the full peer budget `config` asks for (module docstring)."""
    if config.control != "none":
        shown = len(context.successes) + len(context.failures) + len(context.foreign_successes)
        return shown == config.n_success + config.n_failure
    return len(context.successes) == config.n_success and len(context.failures) == config.n_failure


def build_condition(
    tokenizer: Any,
    problems: Sequence[Problem],
    groups: Sequence[Sequence[Rollout]],
    verdicts: Sequence[Sequence[Verdict]],
    config: PeerConfig,
    *,
    seed: int,
    max_prompt_tokens: int = 4096,
    templates: TeacherTemplates | None = None,
    layout: str = "paper",
) -> tuple[list[list[TeacherInput]], list[list[bool]]]:
    """Teacher inputs of every rollout under `config`, and whether each context was fully built."""
    inputs = build_teacher_inputs(
        tokenizer,
        problems,
        groups,
        verdicts,
        peers=config,
        templates=templates or TeacherTemplates(),
        max_prompt_tokens=max_prompt_tokens,
        use_context=True,
        seed=seed,
        layout=layout,
    )
    built = [[is_built(t.context, config) for t in row] for row in inputs]
    return inputs, built


@dataclass(frozen=True)
class _Scored:
    logp: list[float]  # per response token
    entropy: list[float]  # of the next-token distribution at each response position


class _Scorer:
    """Per-token log-probs and entropies of responses under one model, batched, cached by
    (prompt, response)."""

    def __init__(self, model: Any, pad_id: int, batch_size: int, temperature: float) -> None:
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size
        self.temperature = temperature
        self.cache: dict[tuple[tuple[int, ...], tuple[int, ...]], _Scored] = {}

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[tuple[int, ...]], responses: Sequence[tuple[int, ...]]
    ) -> list[_Scored]:
        keys = list(zip(prompts, responses, strict=True))
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            batch = build_scoring_batch([p for p, _ in chunk], [r for _, r in chunk], self.pad_id)
            logits_BRV = response_logits(self.model, batch)
            logp_BR = token_logprobs(logits_BRV, batch.response_ids, self.temperature)
            entropy_BR = token_entropy(logits_BRV, self.temperature)
            for row, key in enumerate(chunk):
                n = len(key[1])
                self.cache[key] = _Scored(
                    logp_BR[row, :n].double().tolist(), entropy_BR[row, :n].double().tolist()
                )
        return [self.cache[k] for k in keys]


@dataclass
class ConditionResult:
    """One condition: per-rollout scores (grouped like the rollouts) and their summary."""

    name: str
    scores: list[list[float]]  # (P, G) mean per-token teacher log-prob
    score_sums: list[list[float]]  # (P, G)
    gaps: list[list[list[float]]]  # (P, G, T_i) teacher - student per token
    built: list[list[bool]]  # (P, G)
    prompt_tokens: list[list[int]]  # (P, G)
    seconds: float
    diagnostics: dict[str, float] = field(default_factory=dict)  # see `_diagnostics`
    summary: dict[str, dict[str, MetricSummary]] = field(default_factory=dict)

    def overview(self) -> dict[str, float]:
        flat_built = [b for row in self.built for b in row]
        flat_tokens = [n for row in self.prompt_tokens for n in row]
        return {
            "built_fraction": sum(flat_built) / len(flat_built),
            "prompt_tokens_mean": sum(flat_tokens) / len(flat_tokens),
            "prompt_tokens_max": float(max(flat_tokens)),
            "seconds": self.seconds,
            **self.diagnostics,
        }


@dataclass
class AnalysisResult:
    problems: list[Problem]
    rewards: list[list[float]]  # (P, G)
    conditions: list[ConditionResult]
    meta: dict[str, Any] = field(default_factory=dict)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


DIAGNOSTICS = (
    "p_eot_teacher",
    "p_eot_student",
    "entropy_gap",
    "gap_success",
    "gap_failure",
    "gap_first_success",
)


def _diagnostics(
    teacher: Sequence[_Scored],
    student: Sequence[_Scored],
    rollouts: Sequence[Rollout],
    success: Sequence[bool],
) -> dict[str, float]:
    """Would this context mislead the student? (module docstring) Means over rollouts.

    P(end-of-turn): probability of the last token of complete (not truncated) successes,
    which is the end-of-turn token the engine stopped at.
    """
    complete = [
        i for i, r in enumerate(rollouts) if success[i] and not r.truncated and r.response_ids
    ]
    gaps = [
        _mean([a - b for a, b in zip(t.logp, s.logp, strict=True)])
        for t, s in zip(teacher, student, strict=True)
    ]
    entropy = [
        _mean([a - b for a, b in zip(t.entropy, s.entropy, strict=True)])
        for t, s in zip(teacher, student, strict=True)
    ]
    scored = [i for i, r in enumerate(rollouts) if r.response_ids]
    return {
        "p_eot_teacher": _mean([math.exp(teacher[i].logp[-1]) for i in complete]),
        "p_eot_student": _mean([math.exp(student[i].logp[-1]) for i in complete]),
        "entropy_gap": _mean([entropy[i] for i in scored]),
        "gap_success": _mean([gaps[i] for i in scored if success[i]]),
        "gap_failure": _mean([gaps[i] for i in scored if not success[i]]),
        "gap_first_success": _mean(
            [teacher[i].logp[0] - student[i].logp[0] for i in scored if success[i]]
        ),
    }


def _condition_result(
    name: str,
    inputs: Sequence[Sequence[TeacherInput]],
    built: list[list[bool]],
    teacher: Sequence[_Scored],
    student: Sequence[_Scored],
    groups: Sequence[Sequence[Rollout]],
) -> ConditionResult:
    """Per-rollout scores and per-token gaps of one condition, grouped like `groups`."""
    shape = [len(g) for g in groups]
    gaps = [
        [a - b for a, b in zip(t.logp, s.logp, strict=True)]
        for t, s in zip(teacher, student, strict=True)
    ]
    return ConditionResult(
        name=name,
        scores=regroup([_mean(t.logp) for t in teacher], shape),
        score_sums=regroup([sum(t.logp) for t in teacher], shape),
        gaps=regroup(gaps, shape),
        built=built,
        prompt_tokens=[[len(t.prompt_ids) for t in row] for row in inputs],
        seconds=0.0,
    )


def analyze_groups(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    groups: Sequence[Sequence[Rollout]],
    verdicts: Sequence[Sequence[Verdict]],
    conditions: Sequence[str] = DEFAULT_CONDITIONS,
    *,
    teacher: Any | None = None,
    seed: int = 0,
    control_base: str = "2S1F",
    policy: str = "random",
    threshold: float = 0.5,
    max_prompt_tokens: int = 4096,
    templates: TeacherTemplates | None = None,
    batch_size: int = 8,
    n_boot: int = 1000,
    layouts: Sequence[str] = ("paper",),
    temperature: float = 1.0,
    progress: bool = False,
) -> AnalysisResult:
    """Score every rollout under every condition and layout and summarise (module docstring).

    `model` is the student (plain prompt, for the gap); `teacher` defaults to `model`.
    The base condition (no peers) is scored once, whatever the layouts. Both models are
    read at ``softmax(logits / temperature)``: use the distillation loss's temperature.
    `progress`: a bar over the scoring passes (stderr).
    """
    runs = [
        (c if layout == "paper" else f"{c}@{layout}", c, layout)
        for layout in layouts
        for c in conditions
        if layout == layouts[0] or c.lower() != "base"
    ]
    configs = [
        condition_config(c, control_base=control_base, policy=policy, threshold=threshold)
        for _, c, _ in runs
    ]
    pad = tokenizer.pad_token_id
    student = _Scorer(model, pad, batch_size, temperature)
    scorer = (
        student
        if teacher is None or teacher is model
        else _Scorer(teacher, pad, batch_size, temperature)
    )
    plain = [tuple(chat_prompt_ids(tokenizer, p.messages)) for p in problems]
    shape = [len(g) for g in groups]
    responses = [r.response_ids for g in groups for r in g]
    bar = tqdm(total=1 + len(runs), desc="scoring", unit="context", disable=not progress)
    bar.set_postfix_str("student")
    student_scored = student([plain[u] for u, n in enumerate(shape) for _ in range(n)], responses)
    bar.update()
    rewards = [[v.reward for v in row] for row in verdicts]
    flat_rollouts = [r for g in groups for r in g]
    flat_success = [x >= threshold for row in rewards for x in row]
    results = []
    for (name, _, layout), config in zip(runs, configs, strict=True):
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        inputs, built = build_condition(
            tokenizer, problems, groups, verdicts, config, seed=seed,
            max_prompt_tokens=max_prompt_tokens, templates=templates, layout=layout,
        )  # fmt: skip
        teacher_scored = scorer([t.prompt_ids for row in inputs for t in row], responses)
        result = _condition_result(name, inputs, built, teacher_scored, student_scored, groups)
        result.seconds = time.perf_counter() - t0
        result.diagnostics = _diagnostics(
            teacher_scored, student_scored, flat_rollouts, flat_success
        )
        # Empty responses have no score: leave them out of the ranking.
        pairs = [
            (
                [s for s, r in zip(s_G, g, strict=True) if r.response_ids],
                [x for x, r in zip(r_G, g, strict=True) if r.response_ids],
            )
            for s_G, r_G, g in zip(result.scores, rewards, groups, strict=True)
        ]
        result.summary = summarize_signal(pairs, threshold=threshold, n_boot=n_boot, seed=seed)
        results.append(result)
        bar.update()
    bar.close()
    meta = {
        "n_prompts": len(problems),
        "group_sizes": sorted(set(shape)),
        "threshold": threshold,
        "control_base": control_base,
        "policy": policy,
        "seed": seed,
        "layouts": list(layouts),
        "score_temperature": temperature,
        "n_both_present": sum(1 for r_G in rewards if len({x >= threshold for x in r_G}) == 2),
    }
    return AnalysisResult(list(problems), rewards, results, meta)


def sample_groups(
    engine: Any,
    tokenizer: Any,
    task: Any,
    problems: Sequence[Problem],
    *,
    n: int,
    params: Any,
    seed: int,
    progress: str | None = None,
) -> tuple[list[list[Rollout]], list[list[Verdict]]]:
    """G = `n` rollouts per prompt from `engine`, verified by `task` (`progress`: the
    label of a progress bar, None for none)."""
    with sampling_bar(progress, len(problems) * n):
        sampled = sample_and_verify_groups(
            engine, tokenizer, task, problems, n=n, params=params, seed=seed
        )
    return sampled.groups, sampled.verdicts


def load_rollout_groups(
    path: str | Path, tokenizer: Any, *, max_groups: int | None = None
) -> tuple[list[Problem], list[list[Rollout]], list[list[Verdict]]]:
    """Groups of a run's rollout file (``rollouts.jsonl`` or ``rollouts_full.jsonl``).

    Records are grouped by (step, problem). Full records carry the student's messages and
    response token ids; sample records only the question and the text, so the question
    becomes a single user message and the text is re-tokenised (plus EOS unless the
    rollout was truncated), which may differ from the sampled tokens by a merge or two.
    """
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = {}
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_key.setdefault((int(record["step"]), str(record["problem"])), []).append(record)
    problems, groups, verdicts = [], [], []
    for (step, pid), records in list(by_key.items())[:max_groups]:
        first = records[0]
        messages = first.get("messages") or [{"role": "user", "content": first["question"]}]
        problems.append(Problem(id=f"{pid}@{step}", messages=tuple(messages)))
        group = []
        for rec in records:
            ids = rec.get("response_ids")
            if ids is None:
                ids = tokenizer.encode(rec["response"], add_special_tokens=False)
                if not rec.get("truncated", False) and tokenizer.eos_token_id is not None:
                    ids = [*ids, tokenizer.eos_token_id]
            group.append(
                Rollout(tuple(ids), (), rec["response"], bool(rec.get("truncated", False)))
            )
        groups.append(group)
        verdicts.append([Verdict(float(r["reward"]), r.get("feedback")) for r in records])
    if not problems:
        raise ValueError(f"{path} holds no rollout records")
    return problems, groups, verdicts


def signal_rows(result: AnalysisResult, subset: str = "both_present") -> list[list[str]]:
    """Table rows: condition, built fraction, each metric as ``mean [low, high]``, prompt tokens, time."""
    rows = []
    for cond in result.conditions:
        over = cond.overview()
        cells = [cond.name, f"{over['built_fraction']:.2f}"]
        for metric in SIGNAL_METRICS:
            s = cond.summary[subset][metric]
            cells.append("n/a" if s.n_prompts == 0 else f"{s.mean:.3f} [{s.low:.3f}, {s.high:.3f}]")
        cells += [f"{over[name]:.3f}" for name in DIAGNOSTICS]
        cells += [f"{over['prompt_tokens_mean']:.0f}", f"{over['seconds']:.2f}"]
        rows.append(cells)
    return rows


SIGNAL_HEADERS = (
    "condition",
    "built",
    *SIGNAL_METRICS,
    "P(eot) teacher",
    "P(eot) student",
    "entropy gap",
    "gap success",
    "gap failure",
    "first-token gap success",
    "teacher prompt tokens",
    "time (s)",
)


def result_json(result: AnalysisResult) -> dict[str, Any]:
    """JSON-ready summary (per-rollout scores are written separately)."""
    return {
        **result.meta,
        "conditions": {
            c.name: {
                **c.overview(),
                "metrics": {
                    subset: {m: s.as_dict() for m, s in by_metric.items()}
                    for subset, by_metric in c.summary.items()
                },
            }
            for c in result.conditions
        },
    }


def write_analysis(result: AnalysisResult, out_dir: str | Path, *, title: str) -> dict[str, Path]:
    """Write ``analysis.json``, ``analysis.md``, ``scores.jsonl`` and ``signal_auc.png``."""
    from mopd.reporting.compare import signal_png
    from mopd.reporting.report import md_table
    from mopd.reporting.sinks import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("analysis.json", "analysis.md", "scores.jsonl")}
    atomic_write(paths["analysis.json"], json.dumps(result_json(result), indent=2).encode())
    lines = []
    for cond in result.conditions:
        for u, problem in enumerate(result.problems):
            for i, reward in enumerate(result.rewards[u]):
                record = {
                    "condition": cond.name,
                    "problem": problem.id,
                    "index": i,
                    "reward": reward,
                    "built": cond.built[u][i],
                    "score": cond.scores[u][i],
                    "score_sum": cond.score_sums[u][i],
                    "teacher_prompt_tokens": cond.prompt_tokens[u][i],
                    "gap": [round(g, 5) for g in cond.gaps[u][i]],
                }
                lines.append(json.dumps(record))
    atomic_write(paths["scores.jsonl"], ("\n".join(lines) + "\n").encode())
    auc = [(c.name, c.summary["both_present"]["success_auc"]) for c in result.conditions]
    png = signal_png(auc, title=title)
    if png is not None:
        paths["signal_auc.png"] = out / "signal_auc.png"
        atomic_write(paths["signal_auc.png"], png)
    meta = result.meta
    sections = [
        f"# {title}",
        f"{meta['n_prompts']} prompts, group size {', '.join(map(str, meta['group_sizes']))}, "
        f"{meta['n_both_present']} with both a success and a failure. Teacher score: mean "
        "per-token log-prob of the response. Each metric: mean over prompts where it is "
        "defined, with a 95% prompt-level bootstrap interval; undefined prompts are left "
        "out, never counted as 0. `built`: share of rollouts whose context holds the full "
        f"peer count (controls: matched to {meta['control_base']}).",
        "## Prompts with both a success and a failure",
        md_table(SIGNAL_HEADERS, signal_rows(result, "both_present")),
        "## All prompts (where each metric is defined)",
        md_table(SIGNAL_HEADERS, signal_rows(result, "all")),
    ]
    if png is not None:
        sections.append("![Success AUC per condition](signal_auc.png)")
    atomic_write(paths["analysis.md"], ("\n\n".join(sections) + "\n").encode())
    return paths
