"""Diversity of a prompt's sampled responses (method section 9, optional metrics).

A model that collapses onto one answer per prompt can keep mean@k while losing pass@k;
these numbers show it directly. Texts are split on whitespace (no tokenizer needed, and
numbers stay comparable between models with different vocabularies).

- ``distinct_n``: distinct n-grams / all n-grams over the prompt's responses (Li et al.,
  2016). 1.0 = no n-gram repeats anywhere; None when the texts hold no n-gram.
- ``unique_ratio``: distinct response strings / responses.
- ``self_bleu``: mean over responses of the sentence BLEU-4 of that response against the
  other responses of the prompt as references (Zhu et al., 2018). High = similar.
  BLEU here: clipped n-gram precisions p_1..p_4 with uniform weights; p_n for n >= 2
  smoothed as (matches + 1) / (total + 1) (Lin and Och, 2004) so that short responses do
  not score 0; brevity penalty exp(1 - r/c) against the closest reference length r
  (shorter one on ties). An empty response scores 0. None for fewer than two responses.

:func:`diversity_summary` averages each metric over prompts. Standard library only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

__all__ = ["distinct_n", "diversity_summary", "self_bleu", "sentence_bleu", "unique_ratio"]


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of `texts` (whitespace words); None if there are none."""
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        counts.update(_ngrams(text.split(), n))
    total = sum(counts.values())
    return len(counts) / total if total else None


def unique_ratio(texts: Sequence[str]) -> float | None:
    """Distinct strings / strings; None for no texts."""
    return len(set(texts)) / len(texts) if texts else None


def sentence_bleu(hypothesis: str, references: Sequence[str], max_n: int = 4) -> float:
    """Smoothed sentence BLEU of `hypothesis` against `references` (module docstring)."""
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    hyp = hypothesis.split()
    if not hyp:
        return 0.0
    refs = [r.split() for r in references]
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp_counts = _ngrams(hyp, n)
        best_ref: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            best_ref |= _ngrams(ref, n)  # elementwise max: the clip of each n-gram
        matches = sum(min(c, best_ref[g]) for g, c in hyp_counts.items())
        total = sum(hyp_counts.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    c = len(hyp)
    r = min((len(ref) for ref in refs), key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision / max_n)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float | None:
    """Mean BLEU of each text against all the others; None for fewer than two texts."""
    if len(texts) < 2:
        return None
    scores = [
        sentence_bleu(text, [*texts[:i], *texts[i + 1 :]], max_n) for i, text in enumerate(texts)
    ]
    return sum(scores) / len(scores)


def diversity_summary(texts_per_prompt: Sequence[Sequence[str]]) -> dict[str, float]:
    """Prompt-averaged ``distinct_1``, ``distinct_2``, ``unique_ratio``, ``self_bleu``.

    A metric undefined on a prompt is left out of that metric's mean; a metric undefined
    on every prompt is left out of the result.
    """
    per_prompt: dict[str, list[float | None]] = {
        "distinct_1": [distinct_n(t, 1) for t in texts_per_prompt],
        "distinct_2": [distinct_n(t, 2) for t in texts_per_prompt],
        "unique_ratio": [unique_ratio(t) for t in texts_per_prompt],
        "self_bleu": [self_bleu(t) for t in texts_per_prompt],
    }
    out: dict[str, float] = {}
    for name, values in per_prompt.items():
        defined = [v for v in values if v is not None]
        if defined:
            out[name] = sum(defined) / len(defined)
    return out
