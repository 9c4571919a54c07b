"""Metric sinks: the JSONL record survives NaN, kills and resumes; optional sinks fail clearly."""

from __future__ import annotations

import json
import math
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mopd.reporting import (
    METRICS_FILE,
    JsonlSink,
    MetricSink,
    MissingExtraError,
    MultiSink,
    TensorBoardSink,
    WandbSink,
    build_sinks,
    read_metrics,
)

pytestmark = pytest.mark.unit


def _strict_json(line: str) -> dict[str, Any]:
    """json.loads that rejects the NaN/Infinity extensions, as strict JSON readers do."""

    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def _write_rows(path: Path, steps: list[int]) -> None:
    with JsonlSink(path) as sink:
        for step in steps:
            sink.log(step, {"loss/total": step / 10})


class _Recorder:
    """A sink that remembers its calls; `fail` makes log/close raise after recording."""

    def __init__(self, fail: bool = False) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed = False
        self.fail = fail

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.logged.append((step, dict(metrics)))
        if self.fail:
            raise OSError("disk full")

    def close(self) -> None:
        self.closed = True
        if self.fail:
            raise OSError("disk full")


def test_nonfinite_values_are_written_as_null_and_read_back_as_nan(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    before = time.time()
    with JsonlSink(path) as sink:
        sink.log(3, {"loss/total": 1.5, "gap/success": math.nan, "optim/grad_norm": math.inf})
        sink.log(4, {"loss/total": -math.inf, "rollout/success_rate": 0.25})

    raw = [_strict_json(line) for line in path.read_text().splitlines()]
    assert raw[0]["gap/success"] is None and raw[0]["optim/grad_norm"] is None
    assert raw[1]["loss/total"] is None
    assert raw[0]["step"] == 3 and before <= raw[0]["time"] <= time.time()

    rows = read_metrics(path)
    assert [row["step"] for row in rows] == [3, 4]
    assert rows[0]["loss/total"] == 1.5 and rows[1]["rollout/success_rate"] == 0.25
    assert math.isnan(rows[0]["gap/success"]) and math.isnan(rows[0]["optim/grad_norm"])
    assert math.isnan(rows[1]["loss/total"])


def test_each_row_is_on_disk_before_the_sink_is_closed(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / METRICS_FILE)
    sink.log(1, {"loss/total": 0.5})
    # Another reader (or a post-mortem after a kill) sees the row while the sink is open.
    assert read_metrics(tmp_path / METRICS_FILE) == [
        {"step": 1, "time": pytest.approx(time.time(), abs=60), "loss/total": 0.5}
    ]
    sink.close()


def test_torn_final_line_from_a_killed_run_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    _write_rows(path, [1, 2])
    with path.open("a") as handle:
        handle.write('{"step": 3, "time": 17.0, "loss/to')
    with pytest.warns(UserWarning, match="incomplete final line"):
        rows = read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2]


def test_corrupted_line_before_the_end_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "a": 1.0}\nnot json\n{"step": 3, "a": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


def test_resume_drops_rows_logged_after_the_checkpoint_step(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    _write_rows(path, [1, 2, 3, 4, 5])
    with path.open("a") as handle:
        handle.write('{"step": 6, "lo')  # killed while writing step 6

    with pytest.warns(UserWarning, match="incomplete final line"), JsonlSink(path, 3) as sink:
        assert [row["step"] for row in read_metrics(path)] == [1, 2, 3]
        sink.log(4, {"loss/total": 9.0})

    rows = read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss/total"] for row in rows] == [0.1, 0.2, 0.3, 9.0]
    assert [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]  # no temporary file left


def test_reopening_without_resume_appends_after_repairing_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    _write_rows(path, [1])
    with path.open("a") as handle:
        handle.write('{"step": 2, "loss/')
    with pytest.warns(UserWarning, match="incomplete final line"), JsonlSink(path) as sink:
        sink.log(2, {"loss/total": 0.7})
    assert [(row["step"], row["loss/total"]) for row in read_metrics(path)] == [(1, 0.1), (2, 0.7)]


def test_reopening_keeps_a_complete_last_row_missing_only_its_newline(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "time": 5.0, "loss/total": 0.1}')
    with JsonlSink(path) as sink:
        sink.log(2, {"loss/total": 0.2})
    assert [row["step"] for row in read_metrics(path)] == [1, 2]


def test_reserved_and_non_numeric_metrics_are_rejected(tmp_path: Path) -> None:
    with JsonlSink(tmp_path / METRICS_FILE) as sink:
        with pytest.raises(ValueError, match="reserved"):
            sink.log(1, {"step": 1.0})
        with pytest.raises(TypeError, match="'rollout/note'"):
            sink.log(1, {"rollout/note": "high"})  # type: ignore[dict-item]
    assert read_metrics(tmp_path / METRICS_FILE) == []


def test_logging_after_close_raises(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / METRICS_FILE)
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        sink.log(1, {"loss/total": 0.0})


def test_multisink_reaches_every_sink_even_when_one_fails() -> None:
    first, broken, last = _Recorder(), _Recorder(fail=True), _Recorder()
    multi = MultiSink([first, broken, last])
    assert isinstance(multi, MetricSink) and isinstance(first, MetricSink)
    with pytest.raises(OSError, match="disk full"):
        multi.log(7, {"loss/total": 0.5})
    assert first.logged == last.logged == [(7, {"loss/total": 0.5})]
    with pytest.raises(OSError, match="disk full"):
        multi.close()
    assert first.closed and broken.closed and last.closed


def test_build_sinks_always_writes_jsonl_into_the_run_folder(tmp_path: Path) -> None:
    with build_sinks(tmp_path, [], run_name="r", config_dict={}) as sinks:
        assert [type(sink) for sink in sinks.sinks] == [JsonlSink]
        sinks.log(0, {"eval/mean@4": 0.5})
    assert read_metrics(tmp_path / METRICS_FILE)[0]["eval/mean@4"] == 0.5


def test_build_sinks_passes_the_resume_step_to_jsonl(tmp_path: Path) -> None:
    _write_rows(tmp_path / METRICS_FILE, [1, 2, 3])
    build_sinks(tmp_path, ["jsonl"], run_name=None, config_dict=None, resume_from_step=1).close()
    assert [row["step"] for row in read_metrics(tmp_path / METRICS_FILE)] == [1]


def test_build_sinks_rejects_unknown_names_listing_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'mlflow'.*jsonl, tensorboard, wandb"):
        build_sinks(tmp_path, ["jsonl", "mlflow"], run_name="r", config_dict={})
    assert not (tmp_path / METRICS_FILE).exists()


# ------------------------------------------------------------------ optional sinks


def test_missing_tensorboard_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(MissingExtraError, match=r"pip install 'mopd\[tensorboard\]'") as info:
        TensorBoardSink("unused")
    assert isinstance(info.value, ImportError)


def test_missing_wandb_names_the_extra_and_closes_the_jsonl_sink(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    opened: list[JsonlSink] = []
    real_init = JsonlSink.__init__

    def spy_init(self: JsonlSink, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(JsonlSink, "__init__", spy_init)
    with pytest.raises(MissingExtraError, match=r"pip install 'mopd\[wandb\]'"):
        build_sinks(tmp_path, ["wandb"], run_name="r", config_dict={})
    assert len(opened) == 1
    with pytest.raises(RuntimeError, match="closed"):
        opened[0].log(1, {})


def test_tensorboard_sink_writes_each_metric_as_a_scalar_at_its_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, Any]] = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            calls.append(("init", log_dir))

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            calls.append(("scalar", (tag, value, global_step)))

        def flush(self) -> None:
            calls.append(("flush", None))

        def close(self) -> None:
            calls.append(("close", None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    with build_sinks(tmp_path, ["tensorboard"], run_name="r", config_dict={}) as sinks:
        sinks.log(5, {"loss/total": 0.25, "optim/lr": 1e-5})
    assert calls == [
        ("init", str(tmp_path / "tensorboard")),
        ("scalar", ("loss/total", 0.25, 5)),
        ("scalar", ("optim/lr", 1e-5, 5)),
        ("flush", None),
        ("close", None),
    ]


def test_wandb_sink_logs_with_the_step_and_finishes_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, Any]] = []

    class FakeRun:
        def log(self, data: dict[str, float], step: int) -> None:
            calls.append(("log", (data, step)))

        def finish(self) -> None:
            calls.append(("finish", None))

    def init(**kwargs: Any) -> FakeRun:
        calls.append(("init", kwargs))
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = WandbSink("proj", "run-1", {"lr": 1e-5}, tmp_path / "w")
    sink.log(2, {"rollout/success_rate": 0.5})
    sink.close()
    sink.close()
    assert calls == [
        (
            "init",
            {
                "project": "proj",
                "name": "run-1",
                "config": {"lr": 1e-5},
                "dir": str(tmp_path / "w"),
            },
        ),
        ("log", ({"rollout/success_rate": 0.5}, 2)),
        ("finish", None),
    ]


def test_real_tensorboard_event_file_holds_the_logged_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardSink(tmp_path / "tb") as sink:
        sink.log(1, {"loss/total": 0.5})
        sink.log(2, {"loss/total": 0.25})
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("loss/total")
    assert [(event.step, event.value) for event in scalars] == [(1, 0.5), (2, 0.25)]


def test_real_wandb_offline_run_writes_into_the_run_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with WandbSink("mopd-test", "offline-run", {"lr": 1e-5}, tmp_path) as sink:
        sink.log(1, {"loss/total": 0.5})
    assert list((tmp_path / "wandb").glob("offline-run-*"))
