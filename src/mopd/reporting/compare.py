"""Comparison pages: several runs side by side, and the teacher-signal bar chart.

:func:`write_comparison` reads each run folder's ``metrics.jsonl`` (and ``config.yaml``
when present) and writes into one output folder:

- ``compare_eval.png``: evaluation mean@K and pass@K against the step, one colour per run,
  with the prompt-level 95% bootstrap band when the run logged ``eval/ci_low|ci_high/*``;
- ``compare_training.png``: rollout reward, share of rollouts whose teacher saw peers,
  in-batch teacher success AUC and seconds per step, one line per run (long noisy runs
  smoothed as in the single-run report);
- ``compare_diversity.png``: distinct-2, unique ratio and self-BLEU of the evaluation
  samples against the step;
- ``compare.md``: the runs, a final table (last evaluation of each run, ``mean [low, high]``),
  mean time per step, and the images.

A panel or figure with no data in any run is left out. :func:`signal_png` draws the
teacher-signal analysis: success AUC per condition with its interval and the chance line.
Plots use matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mopd.reporting.report import (
    fit_fraction_axis,
    md_table,
    metric_series,
    moving_average,
    png_bytes,
    smoothing_window,
)
from mopd.reporting.sinks import METRICS_FILE, atomic_write, read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from mopd.evaluation.signal import MetricSummary

__all__ = ["Run", "load_run", "signal_png", "write_comparison"]

COMPARE_FILE = "compare.md"


@dataclass(frozen=True)
class Run:
    name: str
    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def eval_k(self) -> int | None:
        """K of the run's ``eval/mean@K`` metric (the largest if several)."""
        ks = [
            int(key.split("@")[1])
            for row in self.rows
            for key in row
            if key.startswith("eval/mean@") and key.split("@")[1].isdigit()
        ]
        return max(ks) if ks else None


def load_run(path: str | os.PathLike[str], name: str | None = None) -> Run:
    """Rows (sorted by step) and config of a run folder written by ``mopd train``."""
    path = Path(path)
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist: pass run folders written by mopd train")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        import yaml

        loaded = yaml.safe_load((path / "config.yaml").read_text())
        config = loaded if isinstance(loaded, dict) else {}
    rows = sorted(read_metrics(metrics), key=lambda row: row["step"])
    return Run(name or path.resolve().name, path, rows, config)


# ------------------------------------------------------------------------ figures


def _plot_runs(ax: Axes, runs: Sequence[Run], key_of: Any, *, smooth: bool, band: bool) -> bool:
    """One line per run of metric ``key_of(run)``; returns whether anything was drawn."""
    drawn = False
    for color, run in enumerate(runs):
        key = key_of(run)
        steps, values = metric_series(run.rows, key) if key else ([], [])
        if not steps:
            continue
        drawn = True
        c = f"C{color % 10}"
        window = smoothing_window(len(steps)) if smooth else 1
        if window > 1:
            ax.plot(steps, values, color=c, alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, window), color=c, linewidth=1.8, label=run.name)
        else:
            ax.plot(steps, values, color=c, marker="o", markersize=4, linewidth=1.6, label=run.name)
        if band:
            name = key.removeprefix("eval/")
            lows = dict(zip(*metric_series(run.rows, f"eval/ci_low/{name}"), strict=True))
            highs = dict(zip(*metric_series(run.rows, f"eval/ci_high/{name}"), strict=True))
            both = [s for s in steps if s in lows and s in highs]
            if both:
                low = [lows[s] for s in both]
                high = [highs[s] for s in both]
                ax.fill_between(both, low, high, color=c, alpha=0.15, linewidth=0)
    if drawn:
        from matplotlib.ticker import MaxNLocator

        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize="small", framealpha=0.85)
    return drawn


@dataclass(frozen=True)
class _Panel:
    title: str
    ylabel: str
    key_of: Any  # Run -> metric key or None
    fraction: bool = False
    band: bool = False


def _figure(
    runs: Sequence[Run], panels: Sequence[_Panel], title: str, smooth: bool
) -> bytes | None:
    from matplotlib.figure import Figure

    has = [p for p in panels if any(metric_series(r.rows, p.key_of(r) or "")[0] for r in runs)]
    if not has:
        return None
    cols = 2 if len(has) > 1 else 1
    nrows = math.ceil(len(has) / cols)
    figure = Figure(figsize=(6.0 * cols, 3.4 * nrows + 0.6), layout="constrained")
    axes = figure.subplots(nrows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, has, strict=False):
        _plot_runs(ax, runs, panel.key_of, smooth=smooth, band=panel.band)
        ax.set_title(panel.title, loc="left", fontweight="bold")
        ax.set_ylabel(panel.ylabel)
        ax.set_xlabel("training step")
        if panel.fraction:
            fit_fraction_axis(ax)
    for ax in axes[len(has) :]:
        ax.set_visible(False)
    figure.suptitle(title)
    return png_bytes(figure)


def _eval_key(kind: str) -> Any:
    def key_of(run: Run) -> str | None:
        k = run.eval_k
        return None if k is None else f"eval/{kind}@{k}"

    return key_of


def _const(key: str) -> Any:
    return lambda run: key


_EVAL_PANELS = (
    _Panel("mean@K (mean reward of K samples)", "score (0-1)", _eval_key("mean"), True, True),
    _Panel("pass@K (P(one of K samples succeeds))", "score (0-1)", _eval_key("pass"), True, True),
)
_TRAINING_PANELS = (
    _Panel("Rollout reward", "mean reward (0-1)", _const("rollout/reward_mean"), True),
    _Panel(
        "Teacher saw peers", "fraction of rollouts (0-1)", _const("teacher/context_fraction"), True
    ),
    _Panel(
        "Teacher success AUC (in batch)", "AUC (0.5 = chance)", _const("teacher/success_auc"), True
    ),
    _Panel("Time per step", "seconds", _const("time/step")),
)
_DIVERSITY_PANELS = (
    _Panel("Distinct 2-grams", "distinct / all 2-grams (0-1)", _const("eval/distinct_2"), True),
    _Panel("Unique responses", "unique / samples (0-1)", _const("eval/unique_ratio"), True),
    _Panel("Self-BLEU (lower = more diverse)", "BLEU-4 (0-1)", _const("eval/self_bleu"), True),
)


def signal_png(conditions: Sequence[tuple[str, MetricSummary]], *, title: str) -> bytes | None:
    """Bar chart: success AUC per condition with its CI, chance at 0.5, prompt count on bars."""
    from matplotlib.figure import Figure

    shown = [(name, s) for name, s in conditions if s.n_prompts > 0 and math.isfinite(s.mean)]
    if not shown:
        return None
    figure = Figure(figsize=(max(6.0, 1.0 * len(shown) + 2.0), 4.4), layout="constrained")
    ax = figure.subplots()
    xs = list(range(len(shown)))
    means = [s.mean for _, s in shown]
    err_low = [max(0.0, s.mean - s.low) for _, s in shown]
    err_high = [max(0.0, s.high - s.mean) for _, s in shown]
    ax.bar(xs, means, color="C0", alpha=0.8, yerr=[err_low, err_high], capsize=4, label="mean AUC")
    ax.axhline(0.5, color="0.3", linestyle="--", linewidth=1.2, label="chance (0.5)")
    for x, (_, s) in zip(xs, shown, strict=True):  # value and prompt count above each bar
        top = max(s.mean, s.high if math.isfinite(s.high) else s.mean)
        ax.text(
            x,
            top + 0.02,
            f"{s.mean:.2f}\nn={s.n_prompts}",
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_xticks(xs, [name for name, _ in shown], rotation=20, ha="right")
    ax.set_ylim(0.0, 1.12)
    ax.set_ylabel("success AUC (teacher score vs verifier)")
    ax.set_xlabel("teacher context condition")
    ax.set_title(f"{title}\nmean over prompts with a success and a failure, 95% bootstrap CI")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small", framealpha=0.9)  # bars start at 0: room below
    return png_bytes(figure)


# ------------------------------------------------------------------------ page


def _cell(run: Run, key: str) -> str:
    steps, values = metric_series(run.rows, key)
    if not steps:
        return "n/a"
    name = key.removeprefix("eval/")
    low = dict(zip(*metric_series(run.rows, f"eval/ci_low/{name}"), strict=True)).get(steps[-1])
    high = dict(zip(*metric_series(run.rows, f"eval/ci_high/{name}"), strict=True)).get(steps[-1])
    text = f"{values[-1]:.3f}"
    return f"{text} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else text


def _last_eval_step(run: Run) -> str:
    key = _eval_key("mean")(run)
    steps = metric_series(run.rows, key)[0] if key else []
    return str(steps[-1]) if steps else "n/a"


def _mean_of(run: Run, key: str) -> str:
    values = metric_series(run.rows, key)[1]
    return f"{sum(values) / len(values):.2f}" if values else "n/a"


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]


def write_comparison(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Run comparison",
) -> Path:
    """Write the comparison page and its figures into `out_dir`; returns ``compare.md``."""
    if not run_dirs:
        raise ValueError("write_comparison needs at least one run folder")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, _unique_names(paths), strict=True)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "compare_eval.png": _figure(
            runs,
            _EVAL_PANELS,
            f"{title}: evaluation (shaded: 95% bootstrap interval over prompts)",
            smooth=False,
        ),
        "compare_training.png": _figure(runs, _TRAINING_PANELS, f"{title}: training", True),
        "compare_diversity.png": _figure(
            runs, _DIVERSITY_PANELS, f"{title}: diversity of evaluation samples", smooth=False
        ),
    }
    run_rows = [
        (
            r.name,
            str(r.config.get("method", "n/a")),
            str((r.config.get("task") or {}).get("name", "n/a")),
            str(max((int(row["step"]) for row in r.rows), default=0)),
            str(r.path),
        )
        for r in runs
    ]
    final_rows = []
    for r in runs:
        k = r.eval_k
        keys = [f"eval/mean@{k}", "eval/pass@1", f"eval/pass@{k}"] if k else []
        cells = [_cell(r, key) for key in keys] or ["n/a"] * 3
        final_rows.append(
            (
                r.name,
                _last_eval_step(r),
                str(k or "n/a"),
                *cells,
                _cell(r, "eval/self_bleu"),
                _mean_of(r, "time/step"),
            )
        )
    sections = [
        f"# {title}",
        md_table(("run", "method", "task", "last step", "folder"), run_rows),
        "## Final evaluation",
        "Last evaluation of each run; brackets: 95% bootstrap interval over prompts.",
        md_table(
            ("run", "step", "K", "mean@K", "pass@1", "pass@K", "self-BLEU", "s / step"),
            final_rows,
        ),
    ]
    for name, data in figures.items():
        path = out / name
        if data is None:
            path.unlink(missing_ok=True)
            continue
        atomic_write(path, data)
        sections.append(f"![{name.removesuffix('.png').replace('_', ' ')}]({name})")
    report = out / COMPARE_FILE
    atomic_write(report, ("\n\n".join(sections) + "\n").encode("utf-8"))
    return report
