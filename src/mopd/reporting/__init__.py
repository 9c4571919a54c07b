"""Where metrics go and what is made of them: sinks (JSONL always; TensorBoard, W&B optional)
and run reports (plots plus a Markdown summary read back from ``metrics.jsonl``).

Importing this package is cheap: matplotlib and the optional sink libraries load only when
a report is drawn or an optional sink is created.
"""

from __future__ import annotations

from mopd.reporting.report import eval_line, eval_summary_rows, summary_table, write_report
from mopd.reporting.sinks import (
    METRICS_FILE,
    SINK_NAMES,
    JsonlSink,
    MetricSink,
    MissingExtraError,
    MultiSink,
    TensorBoardSink,
    WandbSink,
    build_sinks,
    read_metrics,
)

__all__ = [
    "METRICS_FILE",
    "SINK_NAMES",
    "JsonlSink",
    "MetricSink",
    "MissingExtraError",
    "MultiSink",
    "TensorBoardSink",
    "WandbSink",
    "build_sinks",
    "eval_line",
    "eval_summary_rows",
    "read_metrics",
    "summary_table",
    "write_report",
]
