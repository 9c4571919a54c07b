"""Test harnesses that run inside the sandbox, and the parent-side checks of their output.

Three test styles:

- stdin/stdout: no harness; each test is its own sandboxed run with the input on stdin,
  and the parent compares the output. The program never sees an expected output.
- function calls (LiveCodeBench-like): one run; the harness calls the function on every
  input and prints each *return value* as JSON. The parent compares them with the
  expected values, which never enter the sandbox, so a program cannot fake a pass by
  patching the harness, printing results or exiting early: at best it controls what is
  compared, and to win it would have to know the answers.
- assert tests (HumanEval's `check(candidate)`): the expected values are in the test
  code, so the comparison must run inside the sandbox. Defences: return values must be
  plain built-in data (an object whose `__eq__` always answers True is rejected), and a
  pass needs a line with a per-run random nonce that the harness prints only after
  `check` returned, so `os._exit(0)`, `sys.exit` or a swallowed exception count as a
  failure. A program that deliberately searches the interpreter's memory for the nonce
  can still fake a pass in this style (documented in docs/security.md).

Every harness line starts with the nonce; the program's own prints are ignored.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

__all__ = ["assert_program", "function_program", "new_nonce", "parse_lines", "same_value"]

# Shared by both harnesses. `_plain` accepts only exact built-in types (no subclasses,
# no custom __eq__) and converts tuples to lists when `to_json` is set.
_COMMON = r"""
def _make_plain(to_json):
    _type, _id = type, id
    scalars = (int, float, str, bool, type(None))
    containers = (list, tuple) if to_json else (list, tuple, set, frozenset)
    extra = () if to_json else (complex, bytes)

    def plain(value, depth=0):
        t = _type(value)
        if depth > 50:
            raise TypeError("value nested too deeply")
        if t in scalars or t in extra:
            return value
        if t in containers:
            items = [plain(v, depth + 1) for v in value]
            return items if to_json else value
        if t is dict:
            return {k if _type(k) in scalars else plain(k, depth + 1): plain(v, depth + 1)
                    for k, v in value.items()} if not to_json else {
                    str(k): plain(v, depth + 1) for k, v in value.items()}
        raise TypeError("returned a %s; only built-in data types are accepted" % t.__name__)
    return plain
"""

_FUNCTION_HARNESS = (
    _COMMON
    + r"""
def _harness(source, fn_name):
    import json, os, sys
    out, write, dumps, plain = os.dup(1), os.write, json.dumps, _make_plain(True)
    nonce = sys.stdin.readline().strip()
    cases = json.loads(sys.stdin.readline())
    sys.stdin.close()
    os.close(0)

    def emit(*parts):
        write(out, (nonce + " " + dumps(list(parts)) + "\n").encode())

    ns = {"__name__": "solution"}
    try:
        exec(compile(source, "solution.py", "exec"), ns)
        holder = ns.get("Solution")
        fn = getattr(holder(), fn_name) if isinstance(holder, type) else ns[fn_name]
    except BaseException as exc:
        emit("setup", "%s: %s" % (type(exc).__name__, exc))
        return
    for i, args in enumerate(cases):
        try:
            emit("result", i, plain(fn(*args)))
        except BaseException as exc:
            emit("error", i, "%s: %s" % (type(exc).__name__, exc))
    emit("done")

_harness(SOURCE, FN_NAME)
"""
)

_ASSERT_HARNESS = (
    _COMMON
    + r"""
def _harness(source, test, entry_point):
    import os, sys
    out, write, plain = os.dup(1), os.write, _make_plain(False)
    nonce = sys.stdin.readline().strip()
    sys.stdin.close()
    os.close(0)
    ns = {"__name__": "solution"}
    try:
        exec(compile(source, "solution.py", "exec"), ns)
        candidate = ns[entry_point]
        exec(compile(test, "tests.py", "exec"), ns)
        check = ns["check"]

        def guarded(*args, **kwargs):
            return plain(candidate(*args, **kwargs))

        check(guarded)
    except BaseException as exc:
        import traceback
        line = traceback.extract_tb(exc.__traceback__)[-1]
        detail = "%s: %s (%s line %s)" % (type(exc).__name__, exc, line.filename, line.lineno)
        write(out, (nonce + " fail " + detail.replace("\n", " ") + "\n").encode())
        return
    write(out, (nonce + " done\n").encode())

_harness(SOURCE, TEST, ENTRY_POINT)
"""
)


def new_nonce() -> str:
    """A fresh random token per run: the program cannot predict it."""
    return secrets.token_hex(16)


def function_program(source: str, fn_name: str) -> str:
    """Harness calling `fn_name` (a top-level function or a method of `class Solution`)."""
    return _FUNCTION_HARNESS.replace("SOURCE, FN_NAME", f"{source!r}, {fn_name!r}")


def assert_program(source: str, test: str, entry_point: str) -> str:
    """Harness running `test` (defining `check(candidate)`) against `entry_point`."""
    return _ASSERT_HARNESS.replace(
        "SOURCE, TEST, ENTRY_POINT", f"{source!r}, {test!r}, {entry_point!r}"
    )


def parse_lines(stdout: str, nonce: str) -> list[str]:
    """Payloads of the harness's lines (those starting with this run's nonce), in order."""
    prefix = nonce + " "
    return [line[len(prefix) :] for line in stdout.splitlines() if line.startswith(prefix)]


def same_value(got: Any, expected: Any) -> bool:
    """JSON-value equality with a float tolerance (rel 1e-6) and tuples equal to lists."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(map(same_value, got, expected))
    if isinstance(expected, dict) and isinstance(got, dict):
        return got.keys() == expected.keys() and all(same_value(got[k], expected[k]) for k in got)
    return bool(type(got) is type(expected) and got == expected)


def decode_json(text: str) -> Any:
    """`json.loads` that returns the text itself when it is not JSON."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
