"""One writer per run folder: a second one is refused, a released or dead one is not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mopd.errors import RunFolderError
from mopd.training.runlock import RunLock


def test_second_lock_is_refused_until_released(tmp_path):
    first = RunLock(tmp_path / "run")
    with pytest.raises(RunFolderError, match=r"in use by another training \(process \d+\)"):
        RunLock(tmp_path / "run")
    first.release()
    RunLock(tmp_path / "run").release()


def test_another_process_is_refused_and_a_dead_holder_frees_the_folder(tmp_path):
    run = tmp_path / "run"
    held = RunLock(run)
    code = (
        "import sys; from mopd.training.runlock import RunLock; from mopd.errors import "
        "RunFolderError\ntry: RunLock(__import__('pathlib').Path(sys.argv[1]))\n"
        "except RunFolderError as e: print(e); sys.exit(3)"
    )
    other = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert other.returncode == 3 and "in use by another training" in other.stdout
    held.release()
    # A process killed while holding the lock (no release, no cleanup) frees the folder.
    hold = (
        "import os, sys, time; from pathlib import Path; from mopd.training.runlock import "
        "RunLock\nlock = RunLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    with pytest.raises(RunFolderError, match=f"process {holder.pid}"):
        RunLock(run)
    holder.kill()
    holder.wait()
    RunLock(run).release()
