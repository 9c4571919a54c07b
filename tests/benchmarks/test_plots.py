"""benchmarks/plots.py: the systems plots from recorded results."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_systems_plots_are_drawn_from_recorded_results(tmp_path, load_bench):
    plots = load_bench("plots")
    step = {
        "machine": {"date": "2026-11-27 00:00:00"},
        "summary": {
            "grpo": {"generate": 9.0, "student": 13.0, "optimizer": 0.6, "cpu_s": 15.0},
            "mopd": {"generate": 8.0, "teacher": 10.0, "student": 15.0, "cpu_s": 26.0},
        },
    }
    kernel = {
        "command": "python benchmarks/loss_kernel.py --baseline-rev abc123",
        "results": [
            {"V": v, "B": b, "topk": {"peak_minus_grad_mb": 32.0}} for v in (10, 20) for b in (1, 2)
        ],
    }
    plots.plot_step_time(step, tmp_path / "step.png")
    plots.plot_loss_kernel(kernel, tmp_path / "kernel.png")
    for name in ("step.png", "kernel.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
