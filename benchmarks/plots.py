"""Plots of the systems benchmark, drawn from its recorded JSON (no measurement here).

python benchmarks/plots.py   # writes results/systems/{step_time,loss_kernel}.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEMS = HERE / "results" / "systems"

# Step phases as `step_time.py` records them; TRL's trainer exposes only its loss forward.
PHASES = ("generate", "teacher", "student", "optimizer", "loss_forward", "rest")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step_time(result: dict[str, Any], path: Path) -> None:
    """Stacked mean seconds per phase per variant, with the mean CPU time marked."""
    plt = _plt()
    summary = result["summary"]
    variants = list(summary)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.6 * len(variants)))
    left = [0.0] * len(variants)
    for phase in PHASES:
        widths = [summary[v].get(phase) or 0.0 for v in variants]
        if any(widths):
            ax.barh(variants, widths, left=left, label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.scatter([summary[v]["cpu_s"] for v in variants], variants, color="k", marker="|", s=300)
    ax.set_xlabel("seconds per step (bars: wall-time phases; |: process CPU time)")
    ax.set_title(f"Step time, {result['machine']['date'][:10]}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_kernel(result: dict[str, Any], path: Path) -> None:
    """Memory a loss needs beyond the logits' gradient, against batch size, per V."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    words = result["command"].split()
    base = words[words.index("--baseline-rev") + 1] if "--baseline-rev" in words else "base"
    kinds = (
        ("topk", "-o", "top-k + tail"),
        ("topk-base", "--s", f"top-k, kernel of {base}"),
        ("full", ":^", "full vocabulary"),
    )
    for kind, style, name in kinds:
        for vocab in sorted({r["V"] for r in result["results"]}):
            rows = [r for r in result["results"] if r["V"] == vocab and kind in r]
            if rows:
                ax.plot(
                    [r["B"] for r in rows],
                    [r[kind]["peak_minus_grad_mb"] for r in rows],
                    style,
                    label=f"{name}, V={vocab}",
                )
    ax.set_yscale("log")
    ax.set_xlabel("batch size B (T = 1024)")
    ax.set_ylabel("peak memory beyond the logit gradient (MB)")
    ax.set_title("Loss memory: top-k stays flat in V")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    plot_step_time(json.loads((SYSTEMS / "step_time.json").read_text()), SYSTEMS / "step_time.png")
    kernel = json.loads((SYSTEMS / "loss_kernel.json").read_text())
    plot_loss_kernel(kernel, SYSTEMS / "loss_kernel.png")
    print(f"wrote {SYSTEMS / 'step_time.png'} and {SYSTEMS / 'loss_kernel.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
