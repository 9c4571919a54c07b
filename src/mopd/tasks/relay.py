"""Two sandboxes that only exchange data: the candidate's code and the code that checks it.

Assert-style tests (HumanEval's ``check(candidate)``) hold their expected values in the
test code, so the comparison cannot move to the trainer as for function-call tests. Run
in the candidate's process, the checker can be read and patched by the candidate (its
frames, its nonce, its objects). Here they are two sandboxed processes that share no
memory: the *checker* runs the trusted test code with a stand-in for the candidate that
sends each call's arguments out as one line, and the *candidate* process answers with
the return value as one line. The trainer relays the lines. The candidate can only
choose the values it returns (as with any answer); the verdict is the checker's last
line, which the candidate cannot write.
"""

from __future__ import annotations

import os
import selectors
import time
from dataclasses import dataclass

from mopd.tasks.sandbox import SandboxLimits, kill_group, sandboxed, start_sandboxed

__all__ = ["RelayResult", "run_checked"]

_LINE_CAP = 1_000_000  # one request or answer; longer kills the exchange


@dataclass(frozen=True)
class RelayResult:
    """The checker's verdict line (None if it never gave one) and how the exchange ended."""

    verdict: str | None
    detail: str
    wall_seconds: float


def run_checked(checker: str, candidate: str, limits: SandboxLimits) -> RelayResult:
    """Run both programs sandboxed, relaying checker stdout lines to the candidate's stdin
    and candidate stdout lines back, until the checker prints ``done`` or ``fail ...``,
    either side ends, or the wall-clock limit passes. Never raises for what they do."""
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    with (
        sandboxed(checker, limits) as (c_cmd, c_dir),
        sandboxed(candidate, limits) as (a_cmd, a_dir),
    ):
        check = start_sandboxed(c_cmd, c_dir, stdin=True)
        answer = start_sandboxed(a_cmd, a_dir, stdin=True)
        try:
            verdict, detail = _relay(check, answer, deadline)
        finally:
            for proc in (check, answer):
                kill_group(proc.pid)
                proc.wait()
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
    return RelayResult(verdict, detail, time.monotonic() - start)


def _relay(check: object, answer: object, deadline: float) -> tuple[str | None, str]:
    procs = {"check": check, "answer": answer}
    buffers = {"check": b"", "answer": b""}
    with selectors.DefaultSelector() as selector:
        for name, proc in procs.items():
            selector.register(proc.stdout, selectors.EVENT_READ, name)  # type: ignore[attr-defined]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, "time limit exceeded"
            events = selector.select(remaining)
            for key, _ in events:
                name = key.data
                data = os.read(key.fd, 65536)
                if not data:
                    return None, f"the {'tests' if name == 'check' else 'program'} ended early"
                buffers[name] += data
                if len(buffers[name]) > _LINE_CAP:
                    return None, "output limit exceeded"
                while b"\n" in buffers[name]:
                    line, buffers[name] = buffers[name].split(b"\n", 1)
                    if name == "check" and not line.startswith(b"call "):
                        return line.decode("utf-8", "replace"), ""
                    target = procs["answer" if name == "check" else "check"]
                    try:
                        target.stdin.write(line + b"\n")  # type: ignore[attr-defined]
                        target.stdin.flush()  # type: ignore[attr-defined]
                    except (BrokenPipeError, OSError):
                        return None, "the program ended early"
