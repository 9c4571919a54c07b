"""Run untrusted Python in a separate, resource-limited process.

Model-generated code never runs in the trainer's process. Three isolation levels, the
strongest this machine allows (`isolation()`, probed once and announced at start):

- ``bwrap``: bubblewrap (`tasks.bwrap`) with a private /proc, a read-only view of the
  interpreter and system libraries only, size-limited tmpfs as the only writable places,
  no network, no new user namespaces, uid `nobody`; plus a per-run cgroup
  (`tasks.cgroups`) bounding the run's processes and memory (tmpfs included), so runs
  side by side cannot starve each other. Needs `bwrap` (Debian package `bubblewrap`)
  and writable v1 `pids`/`memory` cgroups (root).
- ``namespaces``: `unshare` network, PID and mount namespaces, tmpfs over the
  world-writable directories, uid `nobody` when root; rlimits per process and per user.
- ``basic``: rlimits, a clean environment and a process-group kill only.

In the two lower levels `run_python` writes the program into a fresh temporary
directory and starts

    [unshare --net --pid --mount --fork --kill-child] python -I -S -c LAUNCHER CONFIG

with a cleared environment, stdin from /dev/null unless the caller feeds it, and its own
session (process group). The launcher is a few lines of standard-library Python that run
before the program, inside the new process:

1. in a new mount namespace, mount empty tmpfs over the world-writable directories
   (/tmp, /var/tmp, /run/lock, /dev/shm) so the program cannot leave files there (its
   working directory stays reachable through the already-open cwd);
2. set rlimits: CPU seconds, address space, file size, number of processes (stops fork
   bombs), open files, no core dumps;
3. when started as root, drop to the `nobody` user, so the program can neither write
   the trainer's files, nor read `/proc/<pid>/environ` of the trainer, nor signal it;
4. compile and run the program as `__main__`.

The parent reads stdout/stderr with a cap and a wall-clock deadline; on timeout, on
overflow and after every run it SIGKILLs the whole process group. In a PID namespace the
kernel also kills every process of the namespace when its first process dies, so even a
child that called setsid() cannot outlive the run. The directory is removed afterwards.

In the ``bwrap`` level the same launcher sets the rlimits (not the uid or mounts:
bubblewrap does) inside the bubblewrap sandbox, within the run's cgroup; the cgroup is
emptied with SIGKILL after every run. docs/security.md lists what each level protects.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mopd.tasks.bwrap import bwrap_available, bwrap_command, interpreter
from mopd.tasks.cgroups import RunCgroup, cgroups_available

__all__ = [
    "Isolation",
    "RunResult",
    "SandboxLimits",
    "announce_isolation",
    "isolation",
    "run_python",
]

NOBODY_UID = 65534
_NAMESPACE_PREFIX = ("unshare", "--net", "--pid", "--mount", "--fork", "--kill-child")
_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")
TMPFS_BYTES = 16 * 2**20  # each of /work and /tmp in the bwrap level

# Imported before the privilege drop: where the interpreter lives in a directory that the
# `nobody` user cannot read (e.g. under /root), later imports of other modules fail.
PRELOADED_MODULES = (
    *("array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal"),
    *("fractions", "functools", "heapq", "itertools", "json", "math", "operator", "random"),
    *("re", "socket", "statistics", "string", "traceback", "typing"),
)

# Runs in the child before the program. Standard library only (`-I -S`: no site-packages,
# no PYTHON* variables, no current directory on sys.path).
_LAUNCHER = r"""# mopd sandbox launcher
import builtins, ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
with open("main.py", encoding="utf-8") as f:
    source = f.read()
if cfg["mount_dirs"]:
    libc = ctypes.CDLL(None, use_errno=True)
    for d in cfg["mount_dirs"]:
        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=16m,mode=1777") != 0:
            sys.stderr.write("sandbox: cannot mount tmpfs on %s (errno %d)\n" % (d, ctypes.get_errno()))
            os._exit(97)  # mount failed: the probe then turns namespaces off
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
uid = cfg["uid"]
for name in cfg["preload"]:  # the interpreter's files may be unreadable once we are nobody
    try:
        __import__(name)
    except ImportError:
        pass
if uid is not None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
sys.argv = ["main.py"]
del cfg, f, name, value, uid
def fresh(g, ns):
    g.clear()
    g.update(ns)
    return g
# The program runs as the real __main__ module, with the launcher's names gone.
exec(compile(source, "main.py", "exec"), fresh(globals(), {"__name__": "__main__", "__builtins__": builtins, "__file__": "main.py"}))
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    Args:
        wall_seconds: wall-clock deadline; the process group is killed when it passes.
        cpu_seconds: CPU-time limit (RLIMIT_CPU), whole seconds.
        memory_mb: address-space limit (RLIMIT_AS) in MiB; Python itself needs about 30.
        max_processes: process limit (RLIMIT_NPROC) of the sandbox user.
        max_output_bytes: stdout and stderr together; more kills the run.
        max_file_bytes: largest file the program may write (RLIMIT_FSIZE).
    """

    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    max_processes: int = 32
    max_output_bytes: int = 1_000_000
    max_file_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        checks = {
            "wall_seconds": self.wall_seconds > 0,
            "cpu_seconds": isinstance(self.cpu_seconds, int) and self.cpu_seconds >= 1,
            "memory_mb": isinstance(self.memory_mb, int) and self.memory_mb >= 64,
            "max_processes": isinstance(self.max_processes, int) and self.max_processes >= 1,
            "max_output_bytes": isinstance(self.max_output_bytes, int)
            and self.max_output_bytes >= 1,
            "max_file_bytes": isinstance(self.max_file_bytes, int) and self.max_file_bytes >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"SandboxLimits.{name} is out of range: {getattr(self, name)!r} "
                    "(positive numbers; cpu_seconds >= 1, memory_mb >= 64)"
                )


@dataclass(frozen=True)
class RunResult:
    """Outcome of one run. `returncode` is negative for a signal (e.g. -9 after a kill)."""

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    output_truncated: bool
    wall_seconds: float

    @property
    def ok(self) -> bool:
        """Exited normally with status 0, in time, within the output cap."""
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


@dataclass(frozen=True)
class Isolation:
    """What this machine lets the sandbox do (probed once per process)."""

    namespaces: bool  # network, PID and mount namespaces through `unshare`
    uid: int | None  # user the program runs as, None = the trainer's own user
    bwrap: bool = False  # bubblewrap with a per-run cgroup: the strongest level

    @property
    def level(self) -> str:
        return "bwrap" if self.bwrap else "namespaces" if self.namespaces else "basic"

    def describe(self) -> str:
        """One line for the user: the level and what it leaves open."""
        if self.bwrap:
            return "bwrap (private /proc and filesystem view, no network, per-run cgroup)"
        if self.namespaces:
            return (
                "namespaces (no network, private /tmp; host files readable; install "
                "bubblewrap as root for the bwrap level)"
            )
        return (
            "basic (rlimits only: network, host files and /tmp are reachable; see docs/security.md)"
        )


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe bubblewrap + cgroups, then `unshare` namespaces, and root (to drop to `nobody`).

    As root, bubblewrap's sandbox user is root outside its namespace, which RLIMIT_NPROC
    does not limit: the bwrap level needs the per-run cgroup there.
    """
    uid = NOBODY_UID if os.geteuid() == 0 else None
    if bwrap_available() and (cgroups_available() or uid is None):
        return Isolation(namespaces=True, uid=uid, bwrap=True)
    namespaces = False
    if shutil.which("unshare"):
        result = _run("pass", None, SandboxLimits(), Isolation(namespaces=True, uid=uid))
        namespaces = result.returncode == 0
    return Isolation(namespaces=namespaces, uid=uid)


@functools.lru_cache(maxsize=1)
def announce_isolation() -> Isolation:
    """Probe once and say on stderr which isolation level runs generated code."""
    iso = isolation()
    print(f"mopd: code sandbox: {iso.describe()}", file=sys.stderr)
    return iso


def run_python(
    source: str, *, stdin: str | None = None, limits: SandboxLimits | None = None
) -> RunResult:
    """Run `source` as `__main__` in a sandbox; never raises for anything the program does."""
    return _run(source, stdin, limits or SandboxLimits(), isolation())


def _run(source: str, stdin: str | None, limits: SandboxLimits, iso: Isolation) -> RunResult:
    with sandboxed(source, limits, iso) as (command, workdir):
        return _communicate(command, workdir, stdin, limits)


@contextlib.contextmanager
def sandboxed(
    source: str, limits: SandboxLimits, iso: Isolation | None = None
) -> Iterator[tuple[list[str], str]]:
    """(command, working directory) that run `source` in the sandbox; cleans up on exit.

    Start the command with `start_sandboxed`; on exit every process of the run is killed
    (its cgroup emptied, in the bwrap level) and its directory removed.
    """
    iso = iso or isolation()
    workdir = tempfile.mkdtemp(prefix="mopd-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        rlimits = {
            "RLIMIT_CPU": limits.cpu_seconds,
            "RLIMIT_AS": limits.memory_mb * 2**20,
            "RLIMIT_FSIZE": limits.max_file_bytes,
            "RLIMIT_NPROC": limits.max_processes,
            "RLIMIT_NOFILE": 64,
            "RLIMIT_CORE": 0,
        }
        if iso.bwrap:  # bubblewrap sets the user and the mounts; the cgroup the processes
            config: dict[str, Any] = {
                "mount_dirs": [],
                "uid": None,
                "preload": [],
                "limits": rlimits,
            }
            if os.geteuid() == 0:  # root outside the namespace: NPROC does not apply
                del rlimits["RLIMIT_NPROC"]
            os.chmod(workdir, 0o755)
            prefix = bwrap_command(workdir, tmpfs_bytes=TMPFS_BYTES)
            python = interpreter()[0]
        else:
            if iso.uid is not None:
                os.chown(workdir, iso.uid, iso.uid)  # the program may write its own directory
            config = {
                "mount_dirs": list(_WRITABLE_DIRS) if iso.namespaces else [],
                "uid": iso.uid,
                "preload": list(PRELOADED_MODULES) if iso.uid is not None else [],
                "limits": rlimits,
            }
            prefix = list(_NAMESPACE_PREFIX) if iso.namespaces else []
            python = sys.executable
        command = [*prefix, python, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)]
        if not (iso.bwrap and cgroups_available()):
            yield command, workdir
            return
        memory = limits.memory_mb * 2**20 + 2 * TMPFS_BYTES
        with RunCgroup(max_processes=limits.max_processes, memory_bytes=memory) as group:
            yield group.wrap(command), workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def start_sandboxed(command: list[str], workdir: str, *, stdin: bool) -> subprocess.Popen[bytes]:
    """Start a `sandboxed` command: clean environment, own session, piped output."""
    return subprocess.Popen(
        command,
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )


def _communicate(
    command: list[str], workdir: str, stdin: str | None, limits: SandboxLimits
) -> RunResult:
    """Start the process, collect capped output until exit or deadline, kill its group."""
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    proc = start_sandboxed(command, workdir, stdin=stdin is not None)
    if stdin is not None:
        # A writer thread: a program that never reads must not block the parent.
        threading.Thread(target=_feed, args=(proc, stdin.encode()), daemon=True).start()
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    total, timed_out, truncated = 0, False, False
    with selectors.DefaultSelector() as selector:
        for stream in (proc.stdout, proc.stderr):
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map() and not truncated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                chunks[key.fd].append(data)
                total += len(data)
                if total > limits.max_output_bytes:
                    truncated = True
                    break
    if not timed_out and not truncated:
        try:  # output closed: the program may still be running without it
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    # Always, before reaping: the group id cannot be reused while the leader is unreaped.
    kill_group(proc.pid)
    returncode = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    cap = limits.max_output_bytes
    return RunResult(
        stdout=b"".join(chunks[out_fd])[:cap].decode("utf-8", errors="replace"),
        stderr=b"".join(chunks[err_fd])[:cap].decode("utf-8", errors="replace"),
        returncode=returncode,
        timed_out=timed_out,
        output_truncated=truncated,
        wall_seconds=time.monotonic() - start,
    )


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError, ValueError):  # the program exited or closed stdin
        pass


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
