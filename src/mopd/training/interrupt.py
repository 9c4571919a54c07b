"""Ctrl-C during training: the first one stops after the current step, the second at once.

A step is a unit of work (sample, score, update): stopping halfway would lose it anyway,
so the first SIGINT only asks the loop to stop once the running step is done; the loop
then saves a checkpoint and raises `TrainingInterrupted`, and the command line prints the
exact `--resume` command. A second SIGINT restores Python's default behaviour and raises
KeyboardInterrupt at once (the work since the last checkpoint is lost).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType

__all__ = ["StopRequest", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """Training stopped at the user's request, after `step`, with a checkpoint in `run_dir`."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"interrupted after step {step}")
        self.run_dir, self.step = run_dir, step


class StopRequest:
    """Within ``with StopRequest() as stop:``, ``stop.requested`` turns True on the first
    Ctrl-C (main thread only; elsewhere nothing is installed)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nmopd: stopping after this step and saving a checkpoint "
            "(Ctrl-C again to quit at once)",
            file=sys.stderr,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
