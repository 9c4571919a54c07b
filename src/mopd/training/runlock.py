"""One writer per run folder.

Two trainings writing into one folder would interleave their metrics, rollouts and
checkpoints without a word. The trainer's main process holds an exclusive ``flock`` on
``RUN_DIR/.lock`` from before the models load until training ends; a second training on
the same folder stops at once with a one-line error. The kernel drops the lock when the
process dies, so a killed run never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mopd.errors import RunFolderError

LOCK_FILE = ".lock"


class RunLock:
    """Exclusive lock on a run folder; :meth:`release` (or process exit) frees it."""

    def __init__(self, run_dir: Path) -> None:
        self._fd: int | None = None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # umask applies
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(
                f"{run_dir} is in use by another training (process {holder}): wait for it "
                "to finish, or give this one its own logging.run_name"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a trainer dropped without training must not keep the folder
        self.release()
