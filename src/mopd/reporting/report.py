"""Run reports: plots and a Markdown summary built from a run's ``metrics.jsonl``.

:func:`write_report` reads the rows the trainer logged and writes, into the run folder:

- ``training.png``: up to three panels against the training step: rollout reward and
  success rate, distillation and total loss, and the share of rollouts whose teacher saw
  a peer context. Long, noisy runs are drawn faint per step with a centred moving
  average on top.
- ``eval.png``: evaluation mean@K, pass@1 and pass@K against the step, only when the run
  logged ``eval/*`` rows.
- ``report.md``: title, configuration table, first-versus-last evaluation table, mean
  per-step time breakdown, and the images by relative link (the folder stays browsable
  when moved or zipped).

A metric the run never logged is left out (its line, panel or figure) rather than drawn
empty; files from an earlier report that no longer apply are removed. If a step was
logged twice, the later row wins. :func:`summary_table` and :func:`eval_summary_rows`
give the evaluation comparison as plain fixed-width text for a terminal.
Plots use matplotlib's Agg canvas directly (no pyplot global state, no display needed).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mopd.reporting.sinks import METRICS_FILE, atomic_write, read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Row = Mapping[str, Any]
REPORT_FILE = "report.md"
TRAINING_PNG = "training.png"
EVAL_PNG = "eval.png"
_DPI = 120
_EVAL_KEY = re.compile(r"^eval/(mean|pass)@(\d+)$")
_TIME_ORDER = ("generate", "verify", "context", "teacher", "student", "optimizer")  # pipeline order


@dataclass(frozen=True)
class _Line:
    key: str
    label: str
    style: str = "-"
    marker: str = "o"
    width: float = 1.6


@dataclass(frozen=True)
class _Panel:
    title: str
    ylabel: str
    lines: tuple[_Line, ...]
    fraction: bool = False  # values live in [0, 1]: show the whole range, runs stay comparable


# Coinciding lines (reward = success rate for 0/1 rewards; total = the only loss term)
# are drawn thick underneath and thin dashed on top, so neither hides the other.
_TRAINING_PANELS = (
    _Panel(
        "Rollouts",
        "fraction of rollouts (0-1)",
        (
            _Line("rollout/reward_mean", "mean reward", width=2.8),
            _Line("rollout/success_rate", "success rate", "--", width=1.2),
            _Line("rollout/truncated_fraction", "cut at the token limit", ":", width=1.6),
            _Line("rollout/mixed_group_fraction", "groups with successes and failures", "-."),
        ),
        fraction=True,
    ),
    _Panel(
        "Response length",
        "tokens",
        (_Line("rollout/response_tokens_mean", "mean response length"),),
    ),
    _Panel("Loss", "loss", (_Line("loss/total", "total", width=2.8),)),  # + terms: _panels
    _Panel(
        "Teacher context",
        "fraction of rollouts (0-1)",
        (
            _Line("teacher/context_fraction", "teacher saw peers"),
            _Line("teacher/truncated_fraction", "teacher prompt shortened", "--"),
        ),
        fraction=True,
    ),
)


def _panels(rows: Sequence[Row]) -> list[_Panel]:
    """The training panels with data; the loss panel gets one thin line per logged term."""
    terms = sorted({k for row in rows for k in row if k.startswith("loss/")} - {"loss/total"})
    panels = []
    for panel in _TRAINING_PANELS:
        if panel.title == "Loss":
            extra = (_Line(t, t.removeprefix("loss/"), "--", width=1.2) for t in terms)
            panel = replace(panel, lines=(*panel.lines, *extra))
        if _has_data(rows, panel.lines):
            panels.append(panel)
    return panels


def _number(value: Any) -> float | None:
    """`value` as a finite float; None for missing, null, nan and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_series(rows: Sequence[Row], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step, finite values only, later rows win."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = _number(row.get(key))
        if value is not None:
            by_step[int(row["step"])] = value
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


_CI = ("eval/ci_low/", "eval/ci_high/")
# Display order after mean@K and pass@K; anything else follows alphabetically.
_EVAL_ORDER = (
    "response_tokens_mean",
    "distinct_1",
    "distinct_2",
    "unique_ratio",
    "self_bleu",
)


def _eval_keys(rows: Sequence[Row]) -> list[str]:
    """``eval/*`` names in display order (intervals excluded): mean@K then pass@K by K,
    then the fixed list above, then any others."""

    def order(key: str) -> tuple[int, str, int, str]:
        match = _EVAL_KEY.match(key)
        if match:
            return (0, match[1], int(match[2]), key)
        name = key.removeprefix("eval/")
        rank = _EVAL_ORDER.index(name) if name in _EVAL_ORDER else len(_EVAL_ORDER)
        return (1 + rank, "", 0, key)

    keys = {key for row in rows for key in row if key.startswith("eval/")}
    return sorted((key for key in keys if not key.startswith(_CI)), key=order)


def _first_last_eval(rows: Sequence[Row]) -> tuple[Row, Row] | None:
    """The evaluation before training (empty when the run skipped it) and the last one."""
    eval_rows = sorted(
        (row for row in rows if any(key.startswith("eval/") for key in row)),
        key=lambda row: row["step"],
    )
    if not eval_rows:
        return None
    return (eval_rows[0] if eval_rows[0]["step"] == 0 else {}), eval_rows[-1]


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _eval_cell(row: Row, key: str) -> str:
    """``0.588 [0.425, 0.738]`` when the row holds the metric's interval, else ``0.588``."""
    name = key.removeprefix("eval/")
    value = _number(row.get(key))
    low, high = (_number(row.get(f"{prefix}{name}")) for prefix in _CI)
    if value is None or low is None or high is None:
        return _fmt(value, ".3f")
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _repeats_mean(key: str, keys: Sequence[str], pair: tuple[Row, Row]) -> bool:
    """pass@1 equals mean@k for 0/1 rewards: then it is one number shown twice."""
    if key != "eval/pass@1":
        return False
    means = [k for k in keys if k.startswith("eval/mean@")]
    return bool(means) and all(_number(row.get(key)) == _number(row.get(means[0])) for row in pair)


def eval_line(metrics: Row) -> str:
    """One evaluation's headline: mean@k and pass@k with intervals, response length, time."""
    keys = [k for k in _eval_keys([metrics]) if _EVAL_KEY.match(k)]
    parts = [
        f"{key.removeprefix('eval/')} {_eval_cell(metrics, key)}"
        for key in keys
        if not _repeats_mean(key, keys, (metrics, metrics))
    ]
    tokens, seconds = (_number(metrics.get(k)) for k in ("eval/response_tokens_mean", "time/eval"))
    if tokens is not None:
        parts.append(f"{tokens:.1f} tokens")
    if seconds is not None:
        parts.append(f"({seconds:.0f} s)")
    return "  ".join(parts)


def eval_summary_rows(metrics_rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    """(metric, before, after) for the first and last eval rows, in a fixed order.

    Names lose their ``eval/`` prefix; a value with a logged 95% interval reads
    ``0.588 [0.425, 0.738]``, ``n/a`` if missing. pass@1 is left out when it repeats
    mean@k. Empty when the run logged no evaluation.
    """
    pair = _first_last_eval(metrics_rows)
    if pair is None:
        return []
    first, last = pair
    keys = _eval_keys(pair)
    return [
        (key.removeprefix("eval/"), _eval_cell(first, key), _eval_cell(last, key))
        for key in keys
        if not _repeats_mean(key, keys, pair)
    ]


def summary_table(
    rows: Sequence[Sequence[str]], headers: Sequence[str] = ("metric", "before", "after")
) -> str:
    """Plain fixed-width table: first column left-aligned, the others right-aligned.

    Any column count works as long as every row matches `headers`.
    """
    table = [tuple(headers), *(tuple(row) for row in rows)]
    for row in table[1:]:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells, headers have {len(headers)}")
    widths = [max(len(row[col]) for row in table) for col in range(len(headers))]

    def render(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if col == 0 else cell.rjust(width)
            for col, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(table[0]), rule, *(render(row) for row in table[1:])])


def smoothing_window(n_points: int) -> int:
    """Odd centred window: none below 40 points, about 5% of the run above."""
    return 2 * (n_points // 40) + 1


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Centred mean over `window` points, shrinking at the ends (no edge dip towards 0)."""
    kernel = np.ones(window)
    sums = np.convolve(np.asarray(values, dtype=np.float64), kernel, mode="same")
    counts = np.convolve(np.ones(len(values)), kernel, mode="same")
    return sums / counts


def _draw_lines(ax: Axes, rows: Sequence[Row], lines: Sequence[_Line], smooth: bool) -> int:
    """Plot each line that has data; returns the number of smoothing steps used (1 = none)."""
    from matplotlib.ticker import MaxNLocator

    used_window, all_steps = 1, []
    for color, line in enumerate(lines):
        steps, values = metric_series(rows, line.key)
        if not steps:
            continue
        all_steps += steps
        window = smoothing_window(len(steps)) if smooth else 1
        used_window = max(used_window, window)
        style: dict[str, Any] = {"color": f"C{color}", "linestyle": line.style, "label": line.label}
        if window > 1:
            ax.plot(steps, values, color=f"C{color}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, window), linewidth=line.width + 0.2, **style)
        else:  # thick lines get big markers, so thin lines drawn on top stay visible
            marker: dict[str, Any] = {"marker": line.marker, "markersize": 1.5 + 1.3 * line.width}
            ax.plot(steps, values, linewidth=line.width, **marker, **style)
    if all_steps and max(all_steps) == min(all_steps):  # one step: avoid a +-0.05 step axis
        ax.set_xlim(all_steps[0] - 1, all_steps[0] + 1)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize="small", framealpha=0.85)
    return used_window


def fit_fraction_axis(ax: Axes) -> None:
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, -0.03), max(high, 1.03))


def _has_data(rows: Sequence[Row], lines: Sequence[_Line]) -> bool:
    return any(metric_series(rows, line.key)[0] for line in lines)


def png_bytes(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _training_png(rows: Sequence[Row], title: str) -> bytes | None:
    from matplotlib.figure import Figure

    panels = _panels(rows)
    if not panels:
        return None
    figure = Figure(figsize=(9.0, 2.9 * len(panels) + 0.9), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    window = 1
    for ax, panel in zip(axes, panels, strict=True):
        window = max(window, _draw_lines(ax, rows, panel.lines, smooth=True))
        ax.set_title(panel.title, loc="left", fontweight="bold")
        ax.set_ylabel(panel.ylabel)
        if panel.fraction:
            fit_fraction_axis(ax)
    axes[-1].set_xlabel("step")
    note = f"\nfaint: every step, bold: {window}-step moving average" if window > 1 else ""
    figure.suptitle(f"{title}: training{note}")
    return png_bytes(figure)


def _eval_line(key: str) -> _Line:
    kind, k = key.removeprefix("eval/").split("@")
    if kind == "mean":
        return _Line(key, f"mean@{k}: mean reward of {k} samples", "-", "o", 2.8)
    chance = "a sample succeeds" if k == "1" else f"one of {k} samples succeeds"
    return _Line(key, f"pass@{k}: P({chance})", "--", "s", 1.4)


def _eval_png(rows: Sequence[Row], title: str) -> bytes | None:
    from matplotlib.figure import Figure

    # With 0/1 rewards pass@1 equals mean@K: mean lines are drawn thick and pass lines
    # thin and dashed on top, so coinciding curves stay distinguishable.
    lines = [_eval_line(key) for key in _eval_keys(rows) if _EVAL_KEY.match(key)]
    if not _has_data(rows, lines):
        return None
    figure = Figure(figsize=(9.0, 4.4), layout="constrained")
    ax = figure.subplots()
    _draw_lines(ax, rows, lines, smooth=False)  # evaluations are few: show every point
    for color, line in enumerate(lines):  # the prompt-level 95% interval, where logged
        name = line.key.removeprefix("eval/")
        low, high = (dict(zip(*metric_series(rows, f"{c}{name}"), strict=True)) for c in _CI)
        steps = sorted(set(low) & set(high))
        if steps:
            band = ([low[s] for s in steps], [high[s] for s in steps])
            ax.fill_between(steps, *band, color=f"C{color}", alpha=0.12, linewidth=0)
    fit_fraction_axis(ax)
    ax.set_title(f"{title}: evaluation", loc="left", fontweight="bold")
    ax.set_xlabel("step")
    ax.set_ylabel("score (0-1)")
    return png_bytes(figure)


def _cell(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Markdown table; every column after the first is right-aligned (numbers)."""
    align = ["---", *(["---:"] * (len(headers) - 1))]
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(_cell(cell) for cell in line) + " |" for line in lines)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _eval_section(rows: Sequence[Row], has_plot: bool) -> str:
    pair = _first_last_eval(rows)
    if pair is None:
        return (
            "## Evaluation\n\nNo evaluation rows were logged (no `eval/*` metrics), "
            "so there is no evaluation table or plot."
        )
    first, last = pair
    table_rows = []
    keys = _eval_keys(pair)
    for key in keys:
        if _repeats_mean(key, keys, pair):
            continue
        before, after = _number(first.get(key)), _number(last.get(key))
        change = None if before is None or after is None else after - before
        cells = (_eval_cell(first, key), _eval_cell(last, key), _fmt(change, "+.3f"))
        table_rows.append((key.removeprefix("eval/"), *cells))
    start = f"first (step {first['step']})" if first else "first (step 0 not run)"
    headers = ("metric", start, f"last (step {last['step']})", "change")
    parts = ["## Evaluation", md_table(headers, table_rows)]
    if has_plot:
        parts.append(f"![Evaluation scores against training step]({EVAL_PNG})")
    return "\n\n".join(parts)


def _training_section(has_plot: bool) -> str:
    if not has_plot:
        return (
            "## Training curves\n\nNo rollout, loss or teacher metrics were logged, "
            "so there is no training plot."
        )
    return f"## Training curves\n\n![Training curves against step]({TRAINING_PNG})"


def _timing_section(rows: Sequence[Row]) -> str:
    phases = {key.removeprefix("time/") for row in rows for key in row if key.startswith("time/")}
    if not phases:
        return "## Time per step\n\nNo `time/*` metrics were logged."
    ordered = [p for p in _TIME_ORDER if p in phases]
    # Evaluation runs between steps, not inside them: reported on its own line below.
    ordered += sorted(phases - {*_TIME_ORDER, "step", "eval"})
    means = {p: _mean(metric_series(rows, f"time/{p}")[1]) for p in [*ordered, "step"]}
    total = means["step"] if "step" in phases else None
    itemised = [(p, means[p]) for p in ordered]
    if total is not None:
        rest = total - sum(m for _, m in itemised if m is not None)
        if rest > 0.005 * total:
            itemised.append(("other (not itemised)", rest))
        itemised.append(("step (total)", total))
    table_rows = [
        (name, _fmt(mean, ".2f"), _fmt(None if not total or mean is None else mean / total, ".1%"))
        for name, mean in itemised
    ]
    parts = [
        "## Time per step",
        "Mean seconds per step over the steps that logged each phase.",
        md_table(("phase", "mean (s)", "share of step"), table_rows),
    ]
    eval_times = metric_series(rows, "time/eval")[1]
    if eval_times:
        parts.append(
            f"Evaluation (between steps): {_mean(eval_times):.2f} s on average over "
            f"{len(eval_times)} evaluations."
        )
    throughput = _mean(metric_series(rows, "perf/tokens_per_s")[1])
    if throughput is not None:
        parts.append(f"Throughput: {throughput:,.0f} tokens/s (mean of `perf/tokens_per_s`).")
    return "\n\n".join(parts)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _overview(rows: Sequence[Row]) -> str:
    if not rows:
        return "The run has not logged any metrics yet."
    steps = [int(row["step"]) for row in rows]
    n_eval = sum(1 for row in rows if any(key.startswith("eval/") for key in row))
    return (
        f"{len(rows)} metric rows from step {min(steps)} to step {max(steps)}, "
        f"{n_eval} of them with evaluation results. Source: `{METRICS_FILE}`."
    )


def _put_or_remove(path: Path, data: bytes | None) -> bool:
    """Write `data` atomically, or delete a stale file when there is nothing to show."""
    if data is None:
        path.unlink(missing_ok=True)
        return False
    atomic_write(path, data)
    return True


def write_report(
    run_dir: str | os.PathLike[str],
    *,
    title: str | None = None,
    config_summary: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.md``, ``training.png`` and ``eval.png`` into `run_dir`; returns the report path.

    `config_summary`: settings to show as a table (nested mappings become dotted keys).
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path} does not exist: point write_report at a run folder written by "
            "`mopd train` (it holds metrics.jsonl)"
        )
    rows = sorted(read_metrics(metrics_path), key=lambda row: row["step"])
    title = title or f"Run {run_dir.resolve().name}"
    has_training = _put_or_remove(run_dir / TRAINING_PNG, _training_png(rows, title))
    has_eval = _put_or_remove(run_dir / EVAL_PNG, _eval_png(rows, title))
    sections = [f"# {title}", _overview(rows)]
    if config_summary:
        settings = md_table(("setting", "value"), list(_flatten(config_summary)))
        sections += ["## Configuration", settings]
    sections += [_eval_section(rows, has_eval), _training_section(has_training)]
    sections.append(_timing_section(rows))
    report_path = run_dir / REPORT_FILE
    atomic_write(report_path, ("\n\n".join(sections) + "\n").encode("utf-8"))
    return report_path
