"""Teacher-prompt layout (golden strings) and token-budget fitting."""

from __future__ import annotations

import math

import pytest

from mopd.core.prompts import (
    FittedPrompt,
    SlotCut,
    TeacherTemplates,
    fit_teacher_prompt,
    peer_summary,
    render_teacher_prompt,
    render_teacher_turns,
)

Q = "What is 2 + 3?"
S1 = "2 + 3 = 5. The answer is 5."
S2 = "Adding gives 5."
F1 = "2 + 3 = 6."
INSTRUCTION = "Correctly solve the original question."


def _single_turn(prompt: str | tuple[tuple[str, str], ...]) -> str:
    """The text of a rendered single-turn prompt (counters receive turns)."""
    if isinstance(prompt, str):
        return prompt
    assert len(prompt) == 1 and prompt[0][0] == "user", prompt
    return prompt[0][1]


def words(prompt: str | tuple[tuple[str, str], ...]) -> int:
    """Word count of a text or of chat turns (the counter the fitting receives)."""
    text = prompt if isinstance(prompt, str) else " ".join(c for _, c in prompt)
    return len(text.split())


# ---------------------------------------------------------------------------- rendering


@pytest.mark.unit
class TestRender:
    def test_2s1f_matches_method_layout_exactly(self) -> None:
        expected = (
            "What is 2 + 3?\n"
            "Correct solution:\n"
            "\n"
            "2 + 3 = 5. The answer is 5.\n"
            "Another successful solution:\n"
            "\n"
            "Adding gives 5.\n"
            "A known failed solution (avoid repeating this mistake):\n"
            "\n"
            "2 + 3 = 6.\n"
            "\n"
            "Correctly solve the original question."
        )
        assert render_teacher_prompt(Q, [S1, S2], [F1]) == expected

    def test_single_success_context(self) -> None:
        expected = (
            "What is 2 + 3?\n"
            "Correct solution:\n"
            "\n"
            "2 + 3 = 5. The answer is 5.\n"
            "\n"
            "Correctly solve the original question."
        )
        assert render_teacher_prompt(Q, [S1], []) == expected

    def test_failure_only_context_uses_failure_header(self) -> None:
        expected = (
            "What is 2 + 3?\n"
            "A known failed solution (avoid repeating this mistake):\n"
            "\n"
            "2 + 3 = 6.\n"
            "\n"
            "Correctly solve the original question."
        )
        assert render_teacher_prompt(Q, [], [F1]) == expected

    def test_no_block_gives_plain_question(self) -> None:
        assert render_teacher_prompt(Q, [], []) == Q
        assert render_teacher_prompt(Q, (), (), None) == Q

    def test_third_success_and_second_failure_get_their_own_headers(self) -> None:
        expected = (
            "Q\n"
            "Correct solution:\n\na\n"
            "Another successful solution:\n\nb\n"
            "Another successful solution:\n\nc\n"
            "A known failed solution (avoid repeating this mistake):\n\nx\n"
            "A known failed solution (avoid repeating this mistake):\n\ny\n"
            "\n"
            "Correctly solve the original question."
        )
        assert render_teacher_prompt("Q", ["a", "b", "c"], ["x", "y"]) == expected

    def test_feedback_block_comes_after_failures_before_instruction(self) -> None:
        fb = "Expected 5, got 6."
        expected = (
            "What is 2 + 3?\n"
            "Correct solution:\n\n2 + 3 = 5. The answer is 5.\n"
            "A known failed solution (avoid repeating this mistake):\n\n2 + 3 = 6.\n"
            "Verifier feedback on an earlier attempt at this question:\n\nExpected 5, got 6.\n"
            "\n"
            "Correctly solve the original question."
        )
        assert render_teacher_prompt(Q, [S1], [F1], fb) == expected

    def test_feedback_alone_is_a_context(self) -> None:
        expected = (
            "Q\n"
            "Verifier feedback on an earlier attempt at this question:\n\nwrong\n"
            "\n"
            "Correctly solve the original question."
        )
        assert render_teacher_prompt("Q", [], [], "wrong") == expected

    def test_custom_templates_replace_every_piece(self) -> None:
        templates = TeacherTemplates(
            question_suffix="\n\n",
            success_header="[OK] ",
            extra_success_header="[OK+] ",
            failure_header="[BAD] ",
            feedback_header="[FB] ",
            block_suffix=" |\n",
            instruction="Now you.",
        )
        text = render_teacher_prompt("Q", ["a", "b"], ["x"], "fb", templates)
        assert text == "Q\n\n[OK] a |\n[OK+] b |\n[BAD] x |\n[FB] fb |\nNow you."
        assert render_teacher_prompt("Q", [], [], None, templates) == "Q"

    def test_templates_reject_non_string_field(self) -> None:
        with pytest.raises(TypeError, match="failure_header"):
            TeacherTemplates(failure_header=None)  # type: ignore[arg-type]


# ------------------------------------------------------------- fitting, word counter


@pytest.mark.unit
class TestFitWordCounter:
    def test_prompt_that_fits_is_returned_unchanged(self) -> None:
        full = render_teacher_prompt(Q, [S1, S2], [F1])
        fitted = fit_teacher_prompt(Q, [S1, S2], [F1], count_tokens=words, max_tokens=words(full))
        assert fitted == FittedPrompt(
            full, words(full), truncated=False, fits=True, has_context=True, cuts=()
        )

    def test_failure_is_shortened_first_and_keeps_its_beginning(self) -> None:
        failure = " ".join(f"f{i}" for i in range(50))
        full = render_teacher_prompt(Q, [S1, S2], [failure])
        budget = words(full) - 20
        fitted = fit_teacher_prompt(Q, [S1, S2], [failure], count_tokens=words, max_tokens=budget)
        # 20 words over: the failure keeps its first 30 words, the last glued to the marker.
        kept = " ".join(f"f{i}" for i in range(30)) + "[...]"
        assert fitted.text == render_teacher_prompt(Q, [S1, S2], [kept])
        assert fitted.n_tokens == words(fitted.text) == budget
        assert fitted.truncated and fitted.fits and fitted.has_context
        assert fitted.cuts == (SlotCut("failure", 0, len(failure) - len(kept) + 5, False),)

    def test_kept_length_is_the_longest_that_fits(self) -> None:
        # Brute force over every kept length is the reference for the binary search.
        failure = "alpha beta  gamma delta\nepsilon zeta eta theta iota kappa lambda mu"
        for budget in range(words(render_teacher_prompt(Q, [S1], [])) + 9, 40):
            fitted = fit_teacher_prompt(Q, [S1], [failure], count_tokens=words, max_tokens=budget)
            fitting = [
                k
                for k in range(1, len(failure))
                if words(render_teacher_prompt(Q, [S1], [failure[:k] + "[...]"])) <= budget
            ]
            if words(render_teacher_prompt(Q, [S1], [failure])) <= budget:
                assert not fitted.truncated
            elif fitting:
                assert fitted.text == render_teacher_prompt(
                    Q, [S1], [failure[: max(fitting)] + "[...]"]
                )
            else:
                assert fitted.text == render_teacher_prompt(Q, [S1], [])

    def test_later_success_is_cut_before_the_first_one(self) -> None:
        s1 = " ".join(f"a{i}" for i in range(20))
        s2 = " ".join(f"b{i}" for i in range(20))
        full = render_teacher_prompt(Q, [s1, s2], [F1])
        # Over by more than the failure block (8 header words + 5 text words) but less
        # than failure + second success.
        budget = words(full) - 13 - 9
        fitted = fit_teacher_prompt(Q, [s1, s2], [F1], count_tokens=words, max_tokens=budget)
        assert [(c.kind, c.index, c.dropped) for c in fitted.cuts] == [
            ("failure", 0, True),
            ("success", 1, False),
        ]
        assert fitted.text.startswith(render_teacher_prompt(Q, [s1], [])[: -len(INSTRUCTION) - 1])
        assert "A known failed solution" not in fitted.text
        assert "b0 b1" in fitted.text and "[...]" in fitted.text and "b19" not in fitted.text
        assert fitted.n_tokens <= budget

    def test_last_failure_is_cut_before_earlier_failures(self) -> None:
        f1 = " ".join(f"x{i}" for i in range(20))
        f2 = " ".join(f"y{i}" for i in range(20))
        full = render_teacher_prompt(Q, [S1], [f1, f2])
        fitted = fit_teacher_prompt(
            Q, [S1], [f1, f2], count_tokens=words, max_tokens=words(full) - 5
        )
        assert [(c.kind, c.index) for c in fitted.cuts] == [("failure", 1)]
        assert f1 in fitted.text and "y14[...]" in fitted.text

    def test_slot_too_small_to_keep_anything_is_dropped_with_its_header(self) -> None:
        full = render_teacher_prompt(Q, [S1], [F1])
        # Keeping even "2[...]" (1 word of 5) leaves the prompt one word over.
        fitted = fit_teacher_prompt(Q, [S1], [F1], count_tokens=words, max_tokens=words(full) - 5)
        assert fitted.text == render_teacher_prompt(Q, [S1], [])
        assert fitted.cuts == (SlotCut("failure", 0, len(F1), True),)
        assert fitted.n_dropped == 1 and fitted.has_context

    def test_feedback_is_cut_last(self) -> None:
        fb = " ".join(f"z{i}" for i in range(30))
        skeleton_plus_header = render_teacher_prompt(Q, [], [], "")
        budget = words(skeleton_plus_header) + 10
        fitted = fit_teacher_prompt(Q, [S1, S2], [F1], fb, count_tokens=words, max_tokens=budget)
        assert [c.kind for c in fitted.cuts] == ["failure", "success", "success", "feedback"]
        assert [c.dropped for c in fitted.cuts] == [True, True, True, False]
        assert fitted.text == render_teacher_prompt(
            Q, [], [], " ".join(f"z{i}" for i in range(10)) + "[...]"
        )

    def test_question_and_instruction_are_never_cut(self) -> None:
        long = " ".join(["word"] * 200)
        question = "Solve " + " ".join(["carefully"] * 30) + " please."
        for budget in (60, 80, 150, 300):
            fitted = fit_teacher_prompt(
                question, [long, long], [long], long, count_tokens=words, max_tokens=budget
            )
            assert fitted.text.startswith(question)
            assert fitted.fits and fitted.n_tokens <= budget
            assert fitted.has_context
            assert fitted.text.endswith("\n\n" + INSTRUCTION)

    def test_budget_below_question_plus_instruction_gives_plain_question(self) -> None:
        question = "one two three four five six"
        budget = words(question) + 3  # the instruction alone is 5 words
        fitted = fit_teacher_prompt(
            question, [S1], [F1], "fb", count_tokens=words, max_tokens=budget
        )
        assert fitted.text == question
        assert fitted.fits and fitted.truncated and not fitted.has_context
        assert all(c.dropped for c in fitted.cuts) and len(fitted.cuts) == 3

    def test_plain_question_over_budget_reports_not_fitting(self) -> None:
        question = "one two three four five six"
        fitted = fit_teacher_prompt(question, [S1], [F1], count_tokens=words, max_tokens=3)
        assert fitted.text == question and fitted.n_tokens == 6
        assert not fitted.fits and not fitted.has_context and fitted.truncated
        bare = fit_teacher_prompt(question, [], [], count_tokens=words, max_tokens=3)
        assert bare.text == question and not bare.fits and not bare.truncated

    def test_number_of_token_counts_is_logarithmic_per_slot(self) -> None:
        calls = 0

        def counting(text: tuple[tuple[str, str], ...]) -> int:
            nonlocal calls
            calls += 1
            return words(text)

        failure = " ".join(f"w{i}" for i in range(5000))
        success = " ".join(f"s{i}" for i in range(5000))
        budget = words(render_teacher_prompt(Q, [success], [])) - 100
        fitted = fit_teacher_prompt(
            Q, [success], [failure], count_tokens=counting, max_tokens=budget
        )
        assert fitted.fits and [c.kind for c in fitted.cuts] == ["failure", "success"]
        # full + skeleton + failure (dropping it is not enough: no search) + success
        # (drop, then a binary search over its ~29k characters).
        assert calls <= 4 + math.ceil(math.log2(len(success)))

    def test_rejects_non_positive_budget(self) -> None:
        with pytest.raises(ValueError, match="max_tokens"):
            fit_teacher_prompt(Q, [S1], [], count_tokens=words, max_tokens=0)

    def test_custom_marker(self) -> None:
        failure = " ".join(f"f{i}" for i in range(50))
        full = render_teacher_prompt(Q, [], [failure])
        fitted = fit_teacher_prompt(
            Q, [], [failure], count_tokens=words, max_tokens=words(full) - 10, marker=" <cut>"
        )
        assert " <cut>\n" in fitted.text and "[...]" not in fitted.text


# ----------------------------------------------------------- fitting, real tokenizer


@pytest.mark.integration
class TestFitRealTokenizer:
    @staticmethod
    def chat_counter(tokenizer):
        def count(prompt) -> int:
            text = _single_turn(prompt)
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return len(tokenizer(rendered, add_special_tokens=False).input_ids)

        return count

    def test_cut_prompt_fits_and_keeps_question_and_instruction(self, tokenizer) -> None:
        def count(prompt) -> int:
            return len(tokenizer(_single_turn(prompt)).input_ids)

        question = "Compute 17 * 23 and explain each step."
        s1 = "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391. " * 20
        s2 = "Multiply: 23 * 17 is 391 because 23 * 10 = 230 and 23 * 7 = 161. " * 20
        f1 = "17 * 23 = 17 * 20 + 17 * 3 = 340 + 41 = 381. " * 20
        n_full = count(render_teacher_prompt(question, [s1, s2], [f1]))
        n_no_failure = count(render_teacher_prompt(question, [s1, s2], []))
        # Over budget by less than the failure block: only the failure is shortened.
        budget = (n_full + n_no_failure) // 2
        fitted = fit_teacher_prompt(question, [s1, s2], [f1], count_tokens=count, max_tokens=budget)
        assert fitted.n_tokens == count(fitted.text) <= budget
        assert fitted.text.startswith(question + "\nCorrect solution:\n\n" + s1)
        assert fitted.text.endswith("[...]\n\n" + INSTRUCTION)
        assert [(c.kind, c.dropped) for c in fitted.cuts] == [("failure", False)]
        assert s2 in fitted.text and f1[:40] in fitted.text and f1 not in fitted.text
        # Maximal: one more character of the failure would not fit.
        kept = len(f1) - fitted.cuts[0].chars_removed
        one_more = render_teacher_prompt(question, [s1, s2], [f1[: kept + 1] + "[...]"])
        assert count(one_more) > budget

    def test_tight_budget_with_chat_template_drops_failure_then_cuts_successes(
        self, tokenizer
    ) -> None:
        count = self.chat_counter(tokenizer)
        question = "Name three prime numbers greater than 10."
        s1 = "Primes above ten include 11, 13 and 17. " * 15
        s2 = "Examples: 19, 23, 29 are all prime. " * 15
        f1 = "12, 14 and 15 are prime. " * 15
        plain_1s = count(render_teacher_prompt(question, [s1], []))
        budget = plain_1s - 20
        fitted = fit_teacher_prompt(question, [s1, s2], [f1], count_tokens=count, max_tokens=budget)
        assert fitted.fits and fitted.n_tokens == count(fitted.text) <= budget
        assert [(c.kind, c.index, c.dropped) for c in fitted.cuts] == [
            ("failure", 0, True),
            ("success", 1, True),
            ("success", 0, False),
        ]
        assert fitted.text.startswith(question + "\nCorrect solution:\n\nPrimes above ten")
        assert fitted.text.endswith("[...]\n\n" + INSTRUCTION)
        assert "Another successful" not in fitted.text and "known failed" not in fitted.text

    def test_prompt_within_budget_is_untouched(self, tokenizer) -> None:
        count = self.chat_counter(tokenizer)
        full = render_teacher_prompt(Q, [S1, S2], [F1])
        fitted = fit_teacher_prompt(Q, [S1, S2], [F1], count_tokens=count, max_tokens=count(full))
        assert fitted.text == full and not fitted.truncated and fitted.cuts == ()


# ------------------------------------------------------------------------- layouts


@pytest.mark.unit
class TestLayouts:
    def test_paper_layout_is_one_user_turn_with_the_paper_text(self) -> None:
        turns = render_teacher_turns(Q, [S1, S2], [F1])
        assert turns == (("user", render_teacher_prompt(Q, [S1, S2], [F1])),)

    def test_multi_turn_layout_makes_each_peer_an_assistant_turn_with_its_verdict(self) -> None:
        again = "\n\nSolve the question again:\n\n" + Q
        turns = render_teacher_turns(Q, [S1, S2], [F1], layout="multi-turn")
        assert turns == (
            ("user", Q),
            ("assistant", S1),
            ("user", "That answer is correct." + again),
            ("assistant", S2),
            ("user", "That answer is correct." + again),
            ("assistant", F1),
            ("user", "That answer is wrong. Avoid repeating this mistake." + again),
        )

    def test_multi_turn_feedback_joins_the_last_verdict_and_plain_without_peers(self) -> None:
        turns = render_teacher_turns(Q, [], [F1], "off by one", layout="multi-turn")
        assert turns[-1] == (
            "user",
            "That answer is wrong. Avoid repeating this mistake.\n\n"
            "Verifier feedback on an earlier attempt at this question:\n\noff by one"
            "\n\nSolve the question again:\n\n" + Q,
        )
        assert render_teacher_turns(Q, [], [], layout="multi-turn") == (("user", Q),)
        feedback_only = render_teacher_turns(Q, [], [], "fb", layout="multi-turn")
        assert feedback_only == (("user", render_teacher_prompt(Q, [], [], "fb")),)

    def test_summaries_use_the_summary_tag_or_the_first_300_characters(self) -> None:
        tagged = "long work ... <summary> add the units digits </summary> done"
        untagged = "x" * 400
        assert peer_summary(tagged) == "add the units digits"
        assert peer_summary(untagged) == "x" * 300
        fitted = fit_teacher_prompt(
            Q, [tagged], [untagged], count_tokens=words, max_tokens=10_000, layout="summaries"
        )
        assert fitted.text == (
            Q + "\nSummary of a successful solution:\n\nadd the units digits\n"
            "Summary of an unsuccessful solution:\n\n" + "x" * 300 + "\n\n" + INSTRUCTION
        )

    def test_multi_turn_fitting_shortens_peers_inside_their_turns(self) -> None:
        failure = " ".join(f"f{i}" for i in range(200))
        full = render_teacher_turns(Q, [S1], [failure], layout="multi-turn")
        budget = words(full) - 50
        fitted = fit_teacher_prompt(
            Q, [S1], [failure], count_tokens=words, max_tokens=budget, layout="multi-turn"
        )
        assert fitted.fits and fitted.n_tokens == words(fitted.turns) <= budget
        assert [c.kind for c in fitted.cuts] == ["failure"]
        assert fitted.turns[1] == ("assistant", S1)
        assert fitted.turns[3][1].endswith("[...]") and fitted.turns[3][0] == "assistant"
        assert fitted.turns[-1][1].endswith(Q)

    def test_unknown_layout_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="layout must be one of"):
            render_teacher_turns(Q, [S1], [], layout="nope")
