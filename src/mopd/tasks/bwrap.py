"""Bubblewrap (`bwrap`): the sandbox's strongest isolation level.

bubblewrap is a small, maintained setuid-free sandboxing tool (the one Flatpak uses). A
run gets new user, PID, network, IPC, UTS and cgroup namespaces, no capabilities, no way
to create further user namespaces, and a filesystem built from nothing:

- read-only: the interpreter's installation (`sys.base_prefix`: binary and standard
  library) and the system's shared libraries (`/usr/lib`, `/lib*`); nothing else of the
  host, so no data files, no `/etc`, no home directories, no sockets;
- a private `/proc` showing only the run's own processes, a minimal `/dev`;
- writable: a size-limited tmpfs at the working directory `/work` (holding a copy of
  the program) and one at `/tmp`; they vanish with the run;
- the program runs as uid/gid 65534 (`nobody`) inside, with a cleared environment, in a
  new session, and dies with its parent.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["WORKDIR", "bwrap_available", "bwrap_command", "interpreter"]

WORKDIR = "/work"
_LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/usr/libexec")


def interpreter() -> tuple[str, str]:
    """(real path of the base interpreter, its installation prefix); venvs resolved."""
    return os.path.realpath(sys.executable), sys.base_prefix


def bwrap_command(program_dir: str, *, tmpfs_bytes: int, uid: int = 65534) -> list[str]:
    """The `bwrap` prefix that runs a command inside the sandbox described above.

    `program_dir` (the host folder holding ``main.py``) is copied in read-only at
    ``/work/main.py``; the command's working directory is ``/work``.
    """
    executable, prefix = interpreter()
    command = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
    command += ["--new-session", "--cap-drop", "ALL", "--clearenv"]
    command += ["--uid", str(uid), "--gid", str(uid), "--hostname", "sandbox"]
    binds = [*_LIBRARY_DIRS, prefix]
    if not executable.startswith(prefix.rstrip("/") + "/"):
        binds.append(os.path.dirname(executable))
    for path in binds:
        if os.path.isdir(path):
            command += ["--ro-bind", path, path]
    for link in ("/lib", "/lib64"):  # merged-/usr systems: symlinks into /usr
        if os.path.islink(link):
            command += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            command += ["--ro-bind", link, link]
    command += ["--proc", "/proc", "--dev", "/dev"]
    for mount in ("/tmp", WORKDIR):
        command += ["--size", str(tmpfs_bytes), "--perms", "1777", "--tmpfs", mount]
    main = str(Path(program_dir) / "main.py")
    command += ["--ro-bind", main, f"{WORKDIR}/main.py", "--chdir", WORKDIR]
    command += ["--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "--"]
    return command


@functools.lru_cache(maxsize=1)
def bwrap_available() -> bool:
    """Whether `bwrap` runs the interpreter here with every option above (probed once)."""
    if shutil.which("bwrap") is None:
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "main.py").write_text("")
        os.chmod(folder, 0o755)
        probe = [*bwrap_command(folder, tmpfs_bytes=2**20), interpreter()[0], "-I", "-S", "main.py"]
        try:
            done = subprocess.run(probe, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == 0
