"""Diversity metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from mopd.evaluation.diversity import (
    distinct_n,
    diversity_summary,
    self_bleu,
    sentence_bleu,
    unique_ratio,
)

pytestmark = pytest.mark.unit


def test_distinct_n_counts_over_all_responses():
    texts = ["a b a", "a b c"]
    # unigrams: a,b,a,a,b,c -> 3 distinct / 6; bigrams: ab, ba, ab, bc -> 3 / 4
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) is None


def test_unique_ratio_counts_distinct_strings():
    assert unique_ratio(["x", "x", "y", "z"]) == pytest.approx(3 / 4)
    assert unique_ratio([]) is None


def test_identical_responses_have_self_bleu_one():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)


def test_sentence_bleu_hand_computed():
    # hyp "a b c d" vs ref "a b c e": p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1),
    # p4 = (0+1)/(1+1); equal lengths -> no brevity penalty.
    expected = math.exp((math.log(3 / 4) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert sentence_bleu("a b c d", ["a b c e"]) == pytest.approx(expected)


def test_sentence_bleu_brevity_penalty_uses_closest_reference():
    # hyp of 2 words, refs of 4 and 7 words: r = 4, BP = exp(1 - 4/2).
    got = sentence_bleu("a b", ["a b c d", "a b c d e f g"])
    # p1 = 1, p2 = (1+1)/(1+1) = 1, p3 = p4 = (0+1)/(0+1) = 1
    assert got == pytest.approx(math.exp(1 - 4 / 2))


def test_no_shared_word_and_empty_response_score_zero():
    assert sentence_bleu("x y", ["a b"]) == 0.0
    assert sentence_bleu("", ["a b"]) == 0.0
    assert self_bleu(["only one"]) is None


def test_diversity_summary_averages_over_prompts_and_skips_undefined():
    out = diversity_summary([["a b", "a b"], ["c"]])
    assert out["unique_ratio"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["self_bleu"] == pytest.approx(1.0)  # the second prompt has a single sample
    assert out["distinct_2"] == pytest.approx(0.5)  # "c" has no bigram
