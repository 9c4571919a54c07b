"""Hostile programs must be contained by the sandbox and scored as failures.

Each test checks the containment itself (the file does not exist, the parent lives, the
socket saw no connection, no process survives), not only the reward.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from mopd.tasks.code import CodeTask
from mopd.tasks.sandbox import SandboxLimits, isolation, run_python
from mopd.types import Problem

pytestmark = pytest.mark.unit

FAST = SandboxLimits(wall_seconds=2.0, cpu_seconds=1, memory_mb=256, max_processes=16)
NEEDS_NAMESPACES = pytest.mark.skipif(
    not isolation().namespaces, reason="no network/PID namespaces on this machine"
)


def _task(tmp_path: Path) -> CodeTask:
    data = tmp_path / "code.jsonl"
    data.write_text(
        '{"id": "double", "question": "print 2n", "tests": ['
        '{"input": "3\\n", "output": "6"}, {"input": "5\\n", "output": "10"}]}\n'
        '{"id": "add", "question": "add", "fn_name": "add", "tests": ['
        '{"input": [1, 2], "output": 3}, {"input": [2, 2], "output": 4}]}\n'
    )
    return CodeTask(data=str(data), timeout_seconds=2.0, memory_mb=256)


def _problem(task: CodeTask, ident: str) -> Problem:
    return next(p for p in task.train_problems() if p.id == ident)


def _block(code: str) -> str:
    return f"```python\n{code}\n```"


def test_infinite_loop_is_killed_at_the_deadline():
    start = time.monotonic()
    result = run_python("while True: pass", limits=FAST)
    assert not result.ok
    assert time.monotonic() - start < 4.0


def test_sleeping_program_times_out_by_wall_clock():
    result = run_python("import time; time.sleep(30)", limits=FAST)
    assert result.timed_out and result.wall_seconds < 4.0


def _sandbox_user_processes() -> list[str]:
    """Processes that belong to the sandbox user (nobody), zombies excluded."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != isolation().uid:
                continue
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(pid)
    return found


@pytest.mark.skipif(isolation().uid is None, reason="needs root to run programs as nobody")
def test_fork_bomb_is_contained_and_leaves_no_process():
    code = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()  # try to leave the process group\n"
        "            time.sleep(60)\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    start = time.monotonic()
    result = run_python(code, limits=FAST)
    assert not result.ok and time.monotonic() - start < 4.0
    deadline = time.monotonic() + 3.0  # the kernel tears the namespace down asynchronously
    while _sandbox_user_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_user_processes() == []


def test_memory_bomb_ends_quickly():
    start = time.monotonic()
    result = run_python("x = [bytearray(10**7) for _ in range(10**4)]", limits=FAST)
    assert result.returncode != 0 and not result.timed_out
    assert time.monotonic() - start < 2.0


def test_huge_output_is_capped():
    limits = SandboxLimits(wall_seconds=2.0, cpu_seconds=1, max_output_bytes=10_000)
    result = run_python("while True: print('x' * 1000)", limits=limits)
    assert result.output_truncated and not result.ok
    assert len(result.stdout) <= 10_000


def test_file_outside_the_directory_is_not_written(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o755)
    code = f"open({str(target)!r}, 'w').write('x')"
    run_python(code, limits=FAST)
    assert not target.exists()


@NEEDS_NAMESPACES
def test_file_in_world_writable_tmp_does_not_persist():
    target = Path(f"/tmp/mopd-escape-{os.getpid()}-{time.monotonic_ns()}")
    result = run_python(f"open({str(target)!r}, 'w').write('x'); print('wrote')", limits=FAST)
    assert "wrote" in result.stdout  # the write itself succeeds, into a private tmpfs
    assert not target.exists()


def test_parent_environment_secret_is_not_visible(monkeypatch):
    monkeypatch.setenv("MOPD_TEST_SECRET", "hunter2-secret")
    code = (
        "import os\nprint(dict(os.environ))\n"
        "for pid in os.listdir('/proc'):\n"
        "    try: print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except Exception: pass\n"
    )
    result = run_python(code, limits=FAST)
    assert result.returncode == 0
    assert "hunter2-secret" not in result.stdout


@NEEDS_NAMESPACES
def test_socket_to_localhost_does_not_connect():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
        result = run_python(code, limits=FAST)
        assert "connected" not in result.stdout
        with pytest.raises(TimeoutError):
            server.accept()


def test_killing_the_parent_leaves_the_parent_alive():
    code = (
        "import os, signal\n"
        f"for pid in (os.getppid(), {os.getpid()}):\n"
        "    try: os.kill(pid, signal.SIGKILL)\n"
        "    except Exception as e: print(type(e).__name__)\n"
    )
    run_python(code, limits=FAST)
    os.kill(os.getpid(), 0)  # still here (the test would not finish otherwise)


def test_early_exit_after_printing_the_first_answer_fails(tmp_path):
    task = _task(tmp_path)
    code = "import os\nn = int(input())\nprint(2 * n if n == 3 else 0, flush=True)\nos._exit(0)"
    verdict = task.verify(_problem(task, "double"), _block(code))
    assert verdict.reward == 0.0 and verdict.info["pass_fraction"] == 0.5


def test_os_exit_during_function_tests_fails(tmp_path):
    task = _task(tmp_path)
    code = "import os\ndef add(a, b):\n    if (a, b) == (1, 2):\n        return 3\n    os._exit(0)"
    verdict = task.verify(_problem(task, "add"), _block(code))
    assert verdict.reward == 0.0 and verdict.info["pass_fraction"] == 0.5
    assert "did not finish" in (verdict.feedback or "")


def test_always_equal_object_and_patched_json_do_not_pass(tmp_path):
    task = _task(tmp_path)
    code = (
        "import json, builtins, sys\n"
        "class Eq:\n    def __eq__(self, o): return True\n"
        "json.dumps = lambda *a, **k: '[\"done\"]'\n"
        "builtins.print = lambda *a, **k: None\n"
        "def add(a, b): return Eq()\n"
    )
    verdict = task.verify(_problem(task, "add"), _block(code))
    assert verdict.reward == 0.0 and verdict.info["pass_fraction"] == 0.0


def test_assert_style_tests_reject_always_equal_and_early_exit():
    task = CodeTask(source="humaneval", timeout_seconds=2.0)
    problem = next(p for p in task.train_problems() if p.id == "HumanEval/0")
    entry = problem.meta["entry_point"]
    fakes = [
        f"class Eq:\n    def __eq__(self, o): return True\n    def __bool__(self): return True\ndef {entry}(*a): return Eq()",
        f"import os\ndef {entry}(*a):\n    os._exit(0)",
        f"import sys\ndef {entry}(*a):\n    raise SystemExit(0)",
    ]
    for code in fakes:
        assert task.verify(problem, _block(code)).reward == 0.0, code


def test_one_hung_program_does_not_stall_the_batch(tmp_path):
    task = _task(tmp_path)
    problem = _problem(task, "double")
    good = _block("print(2 * int(input()))")
    hung = _block("while True: pass")
    start = time.monotonic()
    verdicts = task.verify_batch([problem] * 4, [hung, good, hung, good])
    assert [v.reward for v in verdicts] == [0.0, 1.0, 0.0, 1.0]
    assert time.monotonic() - start < 8.0
