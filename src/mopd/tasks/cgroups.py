"""Per-run control groups: one sandboxed run's processes, memory and tmpfs pages together.

RLIMIT_NPROC counts the processes of a *user*, so parallel sandboxes running as the same
user share one budget (a fork bomb in one makes its neighbours fail), and other rlimits
are per process (eight children may each take the whole memory limit). A cgroup is per
run: `pids.max` bounds the run's processes and `memory.limit_in_bytes` everything it
holds in RAM, files on its tmpfs included. The v1 `pids` and `memory` hierarchies are
used where they are mounted and writable (root, or a delegated subtree); the cgroup is
created before the run, entered by a shell that then executes the sandbox, and every
process still in it is killed before it is removed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
import uuid
from pathlib import Path

__all__ = ["RunCgroup", "cgroups_available"]

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory")
PARENT = "mopd-sandbox"


@functools.lru_cache(maxsize=1)
def cgroups_available() -> bool:
    """Whether v1 `pids` and `memory` cgroups can be created here (probed once)."""
    try:
        with RunCgroup(max_processes=4, memory_bytes=64 * 2**20):
            return True
    except OSError:
        return False


class RunCgroup:
    """A `pids` + `memory` cgroup for one run (a context manager that cleans up)."""

    def __init__(self, *, max_processes: int, memory_bytes: int) -> None:
        self.name = f"run-{uuid.uuid4().hex[:16]}"
        self.paths = [ROOT / c / PARENT / self.name for c in CONTROLLERS]
        self.max_processes, self.memory_bytes = max_processes, memory_bytes

    def __enter__(self) -> RunCgroup:
        try:
            for path in self.paths:
                path.mkdir(parents=True)
            pids, memory = self.paths
            (pids / "pids.max").write_text(str(self.max_processes))
            (memory / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
            with contextlib.suppress(OSError):  # absent without swap accounting
                (memory / "memory.memsw.limit_in_bytes").write_text(str(self.memory_bytes))
        except OSError:
            self._remove()
            raise
        return self

    def wrap(self, command: list[str]) -> list[str]:
        """`command`, started by a shell that first moves itself into this cgroup."""
        moves = " && ".join(f'echo $$ > "{p}/cgroup.procs"' for p in self.paths)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "sh", *command]

    def processes(self) -> list[int]:
        pids: set[int] = set()
        for path in self.paths:
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in (path / "cgroup.procs").read_text().split())
        return sorted(pids)

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._remove()

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup until none is left (new forks included)."""
        deadline = time.monotonic() + timeout
        while (pids := self.processes()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def _remove(self) -> None:
        for path in self.paths:
            for _ in range(100):  # a killed process leaves the cgroup once it is reaped
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
