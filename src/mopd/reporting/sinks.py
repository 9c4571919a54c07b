"""Metric sinks: where the trainer's per-step metric dicts go.

The trainer produces one flat ``{name: float}`` dict per step with namespaced names
(``rollout/success_rate``, ``loss/distill``, ``time/step``, ``eval/mean@8`` ...) and hands
it to a :class:`MetricSink`. The JSONL file is always written: it is the run's own record,
read back by :func:`read_metrics` for reports and run comparisons. TensorBoard and
Weights & Biases are optional mirrors; their libraries are imported only when asked for.

JSONL format: one object per line, ``{"step": int, "time": unix seconds, **metrics}``.
Non-finite values (nan, +-inf) are written as ``null`` so that every line is strict JSON;
:func:`read_metrics` turns ``null`` back into ``nan``. Each row is written with a single
call and flushed, so a killed run keeps every completed row and at most the final line is
torn; readers skip such a line. Reopening a file repairs a torn tail before appending.
On resume, rows logged after the restored checkpoint's step are dropped (the file is
rewritten atomically), so the resumed run does not log those steps twice.
"""

from __future__ import annotations

import json
import math
import operator
import os
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, runtime_checkable

METRICS_FILE = "metrics.jsonl"
SINK_NAMES = ("jsonl", "tensorboard", "wandb")
_RESERVED = frozenset({"step", "time"})  # row header keys, not metric names


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


@runtime_checkable
class MetricSink(Protocol):
    """Receives one dict of scalar metrics per call."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


_S = TypeVar("_S", bound="_ClosingSink")


class _ClosingSink(ABC):
    """Lets every sink be used as ``with JsonlSink(path) as sink: ...``."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the sink."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _closed_error(sink: object) -> RuntimeError:
    return RuntimeError(f"{type(sink).__name__} is closed; create a new sink to keep logging")


def _finite_or_none(name: str, value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}"
        ) from error
    return number if math.isfinite(number) else None


def _encode_row(step: int, metrics: Mapping[str, float]) -> str:
    clash = _RESERVED.intersection(metrics)
    if clash:
        raise ValueError(
            f"metric names {sorted(clash)} are reserved for the row header; rename them"
        )
    row: dict[str, Any] = {"step": operator.index(step), "time": time.time()}
    row.update({name: _finite_or_none(name, value) for name, value in metrics.items()})
    return json.dumps(row, allow_nan=False) + "\n"  # ASCII only: a torn line never splits a char


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """All complete rows of a metrics file as (raw line, row), and whether a torn final line was skipped.

    Only the last non-empty line may be malformed (the run was killed mid-write); a bad
    line anywhere else means the file is corrupted and raises.
    """
    lines = [
        (number, line)
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1)
        if line.strip()
    ]
    parsed: list[tuple[str, dict[str, Any]]] = []
    for position, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            if position == len(lines) - 1:
                return parsed, True
            raise ValueError(f"{path}:{number}: corrupted metrics row ({error})") from error
        parsed.append((line, row))
    return parsed, False


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of a metrics JSONL file in file order; ``null`` values come back as ``nan``.

    A torn final line (a run killed while writing) is skipped with a warning.
    """
    path = Path(path)
    parsed, torn = _parse_lines(path)
    if torn:
        warnings.warn(
            f"{path}: skipped an incomplete final line (the run was probably stopped mid-write)",
            stacklevel=2,
        )
    return [
        {name: math.nan if value is None else value for name, value in row.items()}
        for _, row in parsed
    ]


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    path = Path(path)
    # A plain open (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keep_rows_through(path: Path, step: int | None) -> None:
    """Drop the rows of a JSONL file (each with a ``step``) after `step`, and a torn last
    line left by a killed run; ``None`` keeps every complete row. No file: nothing to do."""
    if not path.exists():
        return
    raw = path.read_bytes()
    if step is None and (not raw or raw.endswith(b"\n")):
        return  # nothing to drop, nothing torn: append as is
    parsed, torn = _parse_lines(path)
    if torn:
        warnings.warn(
            f"{path}: dropped an incomplete final line left by an interrupted run", stacklevel=4
        )
    if step is not None:
        parsed = [(line, row) for line, row in parsed if row["step"] <= step]
    atomic_write(path, "".join(line + "\n" for line, _ in parsed).encode("utf-8"))


class JsonlSink(_ClosingSink):
    """Appends one JSON row per :meth:`log` call to `path` and flushes it.

    `resume_from_step`: the last step whose results the restored checkpoint holds; rows
    with a larger step are dropped before logging resumes. ``None`` keeps every row.
    """

    def __init__(self, path: str | os.PathLike[str], resume_from_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._prepare_existing(resume_from_step)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def _prepare_existing(self, resume_from_step: int | None) -> None:
        keep_rows_through(self.path, resume_from_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            raise _closed_error(self)
        self._file.write(_encode_row(step, metrics))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardSink(_ClosingSink):
    """Writes every metric as a TensorBoard scalar (tag = metric name) at `step`."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MissingExtraError(
                "TensorBoard logging needs the tensorboard package: pip install 'mopd[tensorboard]'"
            ) from error
        self.log_dir = Path(log_dir)
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            raise _closed_error(self)
        for name, value in metrics.items():
            self._writer.add_scalar(name, float(value), global_step=step)
        self._writer.flush()  # steps are seconds apart: keep the event file current

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbSink(_ClosingSink):
    """Logs to a Weights & Biases run (set ``WANDB_MODE=offline`` to log without network)."""

    def __init__(
        self,
        project: str,
        run_name: str | None,
        config: Mapping[str, Any] | None,
        dir: str | os.PathLike[str],
    ) -> None:
        try:
            import wandb
        except ImportError as error:
            raise MissingExtraError(
                "Weights & Biases logging needs the wandb package: pip install 'mopd[wandb]'"
            ) from error
        Path(dir).mkdir(parents=True, exist_ok=True)
        self._run: Any = wandb.init(
            project=project, name=run_name, config=dict(config or {}), dir=str(dir)
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._run is None:
            raise _closed_error(self)
        self._run.log({name: float(value) for name, value in metrics.items()}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _call_each(sinks: Sequence[MetricSink], action: Callable[[MetricSink], None]) -> None:
    """Run `action` on every sink even if some fail (a W&B hiccup must not cost the JSONL row)."""
    errors: list[Exception] = []
    for sink in sinks:
        try:
            action(sink)
        except Exception as error:
            errors.append(error)
    for extra in errors[1:]:
        warnings.warn(f"another metric sink also failed: {extra!r}", stacklevel=3)
    if errors:
        raise errors[0]


class MultiSink(_ClosingSink):
    """Fans every call out to `sinks`, in order."""

    def __init__(self, sinks: Iterable[MetricSink]) -> None:
        self.sinks: tuple[MetricSink, ...] = tuple(sinks)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        frozen = dict(metrics)  # every sink sees the same values, whatever another one does
        _call_each(self.sinks, lambda sink: sink.log(step, frozen))

    def close(self) -> None:
        _call_each(self.sinks, lambda sink: sink.close())


def build_sinks(
    run_dir: str | os.PathLike[str],
    names: Sequence[str],
    *,
    run_name: str | None,
    config_dict: Mapping[str, Any] | None,
    wandb_project: str = "mopd",
    resume_from_step: int | None = None,
) -> MultiSink:
    """The sinks for a run folder: ``metrics.jsonl`` always, plus the optional `names`.

    Layout: ``run_dir/metrics.jsonl``, ``run_dir/tensorboard/``, ``run_dir/wandb/``.
    `resume_from_step` is passed to :class:`JsonlSink`.
    """
    requested = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in requested if name not in SINK_NAMES]
    if unknown:
        raise ValueError(
            f"unknown metric sink(s) {unknown}; choose from {', '.join(SINK_NAMES)} "
            "(jsonl is always on)"
        )
    run_dir = Path(run_dir)
    wanted = {"jsonl", *requested}
    sinks: list[MetricSink] = []
    try:
        sinks.append(JsonlSink(run_dir / METRICS_FILE, resume_from_step))
        if "tensorboard" in wanted:
            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        if "wandb" in wanted:
            sinks.append(WandbSink(wandb_project, run_name, config_dict, run_dir))
    except BaseException:
        MultiSink(sinks).close()  # do not leak the files opened so far
        raise
    return MultiSink(sinks)
