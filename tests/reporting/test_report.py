"""Run reports: the Markdown tables hold the logged numbers, the plots are real images,
and metrics a run never logged are left out instead of drawn empty."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from mopd.reporting import (
    METRICS_FILE,
    JsonlSink,
    eval_line,
    eval_summary_rows,
    read_metrics,
    summary_table,
    write_report,
)
from mopd.reporting.report import moving_average

pytestmark = pytest.mark.unit

N_SAMPLES = 4  # samples per prompt in the synthetic evaluations (K)
# Correct samples out of 4 for each of 5 prompts, at eval steps 0, 15 and 30.
EVAL_CORRECT = {0: [0, 1, 2, 0, 4], 15: [1, 1, 1, 1, 1], 30: [2, 3, 4, 1, 4]}
TRAIN_STEPS = range(1, 31)


def _eval_metrics(correct: Sequence[int]) -> dict[str, float]:
    """mean@4 and unbiased pass@k = 1 - C(n-c, k)/C(n, k), averaged over prompts, in float64."""
    n = N_SAMPLES

    def pass_at(k: int) -> float:
        return sum(1 - math.comb(n - c, k) / math.comb(n, k) for c in correct) / len(correct)

    return {
        "eval/mean@4": sum(correct) / (n * len(correct)),
        "eval/pass@1": pass_at(1),
        "eval/pass@4": pass_at(4),
    }


def _time_generate(step: int) -> float:
    return 2.0 + step % 3


def _training_metrics(step: int) -> dict[str, float]:
    return {
        "rollout/reward_mean": 0.3 + 0.01 * step,
        "rollout/success_rate": 0.25 + 0.01 * step,
        "rollout/mixed_group_fraction": 0.5,
        "teacher/context_fraction": 0.75,
        "teacher/truncated_fraction": 0.0,
        "loss/total": 1.0 / step,
        "loss/distill": 1.0 / step,
        "time/generate": _time_generate(step),
        "time/teacher": 1.0,
        "time/student": 1.5,
        "time/step": 6.0,
    }


def _write_run(run_dir: Path, *, evals: bool = True, keep: tuple[str, ...] = ()) -> None:
    """Synthetic run; `keep` restricts training metrics to names with these prefixes."""
    with JsonlSink(run_dir / METRICS_FILE) as sink:
        for step in range(0, TRAIN_STEPS.stop):
            if evals and step in EVAL_CORRECT:
                sink.log(step, _eval_metrics(EVAL_CORRECT[step]))
            if step in TRAIN_STEPS:
                metrics = _training_metrics(step)
                if keep:
                    metrics = {k: v for k, v in metrics.items() if k.startswith(keep)}
                sink.log(step, metrics)


def _table_row(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        # Markdown cell borders are the pipes not escaped with a backslash.
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{markdown}")


def _png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert float(np.std(pixels[..., :3])) > 0.05, "the image is blank"
    return tuple(pixels.shape)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("full_run")
    _write_run(run_dir)
    config = {"model": "tiny|llama", "loss": {"alpha": 0.5, "top_k": 100}}
    report = write_report(run_dir, title="MOPD 2S1F test", config_summary=config)
    return run_dir, report.read_text()


def test_eval_table_compares_the_first_and_last_evaluation(full_run: tuple[Path, str]) -> None:
    _, markdown = full_run
    first, last = _eval_metrics(EVAL_CORRECT[0]), _eval_metrics(EVAL_CORRECT[30])
    # Hand check of the references: 7/20 and 14/20 correct; 3/5 and 5/5 prompts solved.
    assert (first["eval/mean@4"], last["eval/mean@4"]) == (0.35, 0.7)
    assert (first["eval/pass@4"], last["eval/pass@4"]) == (0.6, 1.0)
    assert _table_row(markdown, "metric")[1:3] == ["first (step 0)", "last (step 30)"]
    for name in ("mean@4", "pass@4"):
        _, before, after, change = _table_row(markdown, name)
        key = f"eval/{name}"
        assert float(before.split()[0]) == pytest.approx(first[key], abs=5e-4)
        assert float(after.split()[0]) == pytest.approx(last[key], abs=5e-4)
        assert float(change) == pytest.approx(last[key] - first[key], abs=5e-4)
        assert change.startswith("+")
    with pytest.raises(AssertionError, match="no table row"):  # 0/1 rewards: = mean@4
        _table_row(markdown, "pass@1")


def test_report_lists_the_config_and_the_mean_time_per_phase(full_run: tuple[Path, str]) -> None:
    _, markdown = full_run
    assert markdown.startswith("# MOPD 2S1F test\n")
    assert _table_row(markdown, "model") == ["model", "tiny\\|llama"]  # pipe escaped, table intact
    assert _table_row(markdown, "loss.alpha")[1] == "0.5"
    assert _table_row(markdown, "loss.top_k")[1] == "100"

    generate = sum(_time_generate(s) for s in TRAIN_STEPS) / len(TRAIN_STEPS)  # = 3.0
    _, mean, share = _table_row(markdown, "generate")
    assert float(mean) == pytest.approx(generate, abs=0.005)
    assert float(share.rstrip("%")) == pytest.approx(100 * generate / 6.0, abs=0.05)
    # 6.0 s per step, 3.0 + 1.0 + 1.5 itemised: the remaining 0.5 s is reported, not hidden.
    assert float(_table_row(markdown, "other (not itemised)")[1]) == pytest.approx(0.5)
    assert _table_row(markdown, "step (total)")[1:] == ["6.00", "100.0%"]
    first_cells = [
        line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("|")
    ]
    order = [cell for cell in first_cells if cell in ("generate", "teacher", "student")]
    assert order == ["generate", "teacher", "student"]  # pipeline order, not alphabetical


def test_report_embeds_both_plots_as_valid_images(full_run: tuple[Path, str]) -> None:
    run_dir, markdown = full_run
    assert "](training.png)" in markdown and "](eval.png)" in markdown
    height, width, channels = _png_shape(run_dir / "training.png")
    assert 700 <= width <= 1600 and 900 <= height <= 1600 and channels in (3, 4)
    height, width, _ = _png_shape(run_dir / "eval.png")
    assert 700 <= width <= 1600 and 300 <= height <= 800


def test_training_plot_leaves_out_panels_without_metrics(
    tmp_path: Path, full_run: tuple[Path, str]
) -> None:
    _write_run(tmp_path, evals=False, keep=("rollout/",))
    write_report(tmp_path)
    full_height = _png_shape(full_run[0] / "training.png")[0]
    one_panel_height = _png_shape(tmp_path / "training.png")[0]
    assert one_panel_height < full_height / 2


def test_run_without_evaluation_has_no_eval_plot_and_says_so(tmp_path: Path) -> None:
    _write_run(tmp_path, evals=False)
    (tmp_path / "eval.png").write_bytes(b"stale plot from an earlier report")
    markdown = write_report(tmp_path).read_text()
    assert not (tmp_path / "eval.png").exists()
    assert "No evaluation rows were logged" in markdown
    assert "eval.png" not in markdown
    assert (tmp_path / "training.png").exists()


def test_run_with_only_timings_has_no_plots_but_a_timing_table(tmp_path: Path) -> None:
    _write_run(tmp_path, evals=False, keep=("time/",))
    markdown = write_report(tmp_path).read_text()
    assert not (tmp_path / "training.png").exists()
    assert "no training plot" in markdown
    assert _table_row(markdown, "teacher")[1] == "1.00"


def test_missing_metrics_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        write_report(tmp_path)


def test_eval_summary_rows_use_first_and_last_eval_rows_by_step() -> None:
    rows = [
        {"step": 10, "eval/mean@8": 0.5, "eval/pass@8": 0.9, "eval/pass@1": 0.5},
        {"step": 0, "eval/mean@8": 0.25, "eval/pass@1": math.nan},  # logged out of order
        {"step": 5, "loss/total": 1.0},
        {"step": 7, "eval/mean@8": 0.0, "eval/pass@8": 0.0, "eval/pass@1": 0.0},
    ]
    assert eval_summary_rows(rows) == [
        ("mean@8", "0.250", "0.500"),
        ("pass@1", "n/a", "0.500"),
        ("pass@8", "n/a", "0.900"),
    ]
    assert eval_summary_rows([{"step": 1, "loss/total": 0.1}]) == []
    # Without the evaluation before training (eval.at_start=false) there is no "before".
    assert eval_summary_rows(rows[:1] + rows[2:]) == [
        ("mean@8", "n/a", "0.500"),
        ("pass@8", "n/a", "0.900"),  # pass@1 repeats mean@8 in every row there is
    ]


def test_eval_summary_rows_hold_intervals_in_a_fixed_order_without_repeating_mean() -> None:
    def row(step: int, mean: float) -> dict:
        return {
            "step": step,
            "eval/self_bleu": 0.4,
            "eval/pass@4": 0.9,
            "eval/response_tokens_mean": 15.025,
            "eval/ci_high/mean@4": mean + 0.15,
            "eval/mean@4": mean,
            "eval/ci_low/mean@4": mean - 0.1625,
            "eval/pass@1": mean,  # 0/1 rewards: the same number as mean@4
            "eval/distinct_1": 0.6,
        }

    assert eval_summary_rows([row(0, 0.5875), row(10, 0.4125)]) == [
        ("mean@4", "0.588 [0.425, 0.738]", "0.412 [0.250, 0.562]"),
        ("pass@4", "0.900", "0.900"),
        ("response_tokens_mean", "15.025", "15.025"),
        ("distinct_1", "0.600", "0.600"),
        ("self_bleu", "0.400", "0.400"),
    ]


def test_eval_summary_rows_read_back_from_a_real_metrics_file(tmp_path: Path) -> None:
    _write_run(tmp_path)
    rows = eval_summary_rows(read_metrics(tmp_path / METRICS_FILE))
    assert rows[0][0] == "mean@4" and rows[1][0] == "pass@4"
    assert rows[0][1].startswith("0.350") and rows[1][2].startswith("1.000")


def test_summary_table_is_fixed_width_with_numbers_right_aligned() -> None:
    table = summary_table([("mean@8", "0.25", "0.5000"), ("pass@16", "1", "0.9")])
    assert summary_table([("a", "1")], headers=("name", "n")) == "name  n\n----  -\na     1"
    assert table == (
        "metric   before   after\n"
        "-------  ------  ------\n"
        "mean@8     0.25  0.5000\n"
        "pass@16       1     0.9"
    )
    with pytest.raises(ValueError, match="2 cells"):
        summary_table([("only", "two")])


def test_moving_average_is_the_centred_mean_of_available_neighbours() -> None:
    values = [1.0, 4.0, 2.0, 8.0, 5.0, 7.0]
    window = 3
    expected = [
        float(np.mean(values[max(0, i - 1) : min(len(values), i + 2)])) for i in range(len(values))
    ]
    assert moving_average(values, window).tolist() == pytest.approx(expected)


def test_eval_line_is_the_headline_of_one_evaluation() -> None:
    metrics = {
        "eval/mean@4": 0.5875,
        "eval/ci_low/mean@4": 0.425,
        "eval/ci_high/mean@4": 0.7375,
        "eval/pass@1": 0.5875,
        "eval/pass@4": 0.85,
        "eval/response_tokens_mean": 12.66,
        "eval/self_bleu": 0.5,
        "time/eval": 47.2,
    }
    assert eval_line(metrics) == ("mean@4 0.588 [0.425, 0.738]  pass@4 0.850  12.7 tokens  (47 s)")


def test_training_panels_show_length_truncation_and_every_loss_term() -> None:
    from mopd.reporting.report import _panels

    rows = [
        {
            "step": s,
            "rollout/reward_mean": 0.5,
            "rollout/success_rate": 0.5,
            "rollout/truncated_fraction": 0.25,
            "rollout/response_tokens_mean": 12.0 + s,
            "loss/total": 0.1,
            "loss/grpo": 0.09,
            "loss/distill": 0.01,
        }
        for s in (1, 2, 3)
    ]
    panels = {p.title: [line.key for line in p.lines] for p in _panels(rows)}
    assert "rollout/truncated_fraction" in panels["Rollouts"]
    assert panels["Response length"] == ["rollout/response_tokens_mean"]
    assert panels["Loss"] == ["loss/total", "loss/distill", "loss/grpo"]
    assert "Teacher context" not in panels  # no data: no empty panel
    widths = {line.key: line.width for p in _panels(rows) for line in p.lines}
    assert widths["rollout/reward_mean"] > widths["rollout/success_rate"]  # both visible


def test_eval_png_shades_the_logged_intervals() -> None:
    from io import BytesIO

    from mopd.reporting.report import _eval_png

    rows = [{"step": s, "eval/mean@4": 0.5 + 0.1 * s, "eval/pass@4": 0.9} for s in (0, 5, 10)]
    banded = [
        {**r, "eval/ci_low/mean@4": r["eval/mean@4"] - 0.2, "eval/ci_high/mean@4": 0.95}
        for r in rows
    ]
    plain_png, banded_png = _eval_png(rows, "t"), _eval_png(banded, "t")
    assert plain_png is not None and banded_png is not None
    plain = imread(BytesIO(plain_png))[..., :3]
    shaded = imread(BytesIO(banded_png))[..., :3]
    assert plain.shape == shaded.shape
    # The band tints pixels that are plain white without it.
    white = (plain > 0.99).all(axis=-1)
    tinted = white & (shaded < 0.97).any(axis=-1)
    assert tinted.sum() > 500
