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
  code, so the comparison runs in a sandbox too, but not the candidate's: the *checker*
  program runs the test code with a stand-in that sends each call's arguments out, and
  the *answer* program runs the candidate and sends back each return value, as plain
  built-in data in a tagged JSON encoding (tuples, sets, floats like inf stay what they
  are; an object whose `__eq__` always answers True cannot cross). `tasks.relay` runs
  the two and passes lines between them; the verdict is the checker's.

Every function-harness line starts with the nonce; the program's own prints are ignored
(the answer program sends its values on a private copy of stdout and silences the rest).
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

__all__ = ["checked_programs", "function_program", "new_nonce", "parse_lines", "same_value"]

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

# Plain built-in data <-> JSON with tags, the same on both sides of the relay.
_CODEC = r"""
import json as _json

def _enc(v, depth=0):
    t = type(v)
    if depth > 100:
        raise TypeError("value nested too deeply")
    if v is None or t is bool or t is int or t is str:
        return v
    if t is float:
        return {"f": repr(v)}
    if t is list:
        return [_enc(x, depth + 1) for x in v]
    if t in (tuple, set, frozenset):
        return {{tuple: "t", set: "s", frozenset: "z"}[t]: [_enc(x, depth + 1) for x in v]}
    if t is dict:
        return {"d": [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]}
    if t is complex:
        return {"c": [repr(v.real), repr(v.imag)]}
    if t is bytes:
        return {"b": v.hex()}
    raise TypeError("returned a %s; only built-in data types are accepted" % t.__name__)

def _dec(v):
    if type(v) is list:
        return [_dec(x) for x in v]
    if type(v) is not dict:
        return v
    (tag, x), = v.items()
    if tag == "f":
        return float(x)
    if tag in ("t", "s", "z"):
        return {"t": tuple, "s": set, "z": frozenset}[tag](_dec(y) for y in x)
    if tag == "d":
        return {_dec(k): _dec(y) for k, y in x}
    if tag == "c":
        return complex(float(x[0]), float(x[1]))
    if tag == "b":
        return bytes.fromhex(x)
    raise ValueError("unknown tag %r" % tag)
"""

_CHECKER = (
    _CODEC
    + r"""
def _checker(prompt, test, entry_point):
    import sys
    write, readline = sys.stdout.write, sys.stdin.readline

    def candidate(*args, **kwargs):
        write("call " + _json.dumps([_enc(list(args)), _enc(kwargs)]) + "\n")
        sys.stdout.flush()
        kind, value = _json.loads(readline() or '["err", "the program ended"]')
        if kind != "ret":
            raise RuntimeError("the program raised %s" % value)
        return _dec(value)

    ns = {"__name__": "checker"}
    try:
        exec(compile(prompt, "prompt.py", "exec"), ns)  # the prompt's helper functions
        ns[entry_point] = candidate  # tests may call the function by its own name
        exec(compile(test, "tests.py", "exec"), ns)
        ns["check"](candidate)
    except BaseException as exc:
        import traceback
        line = traceback.extract_tb(exc.__traceback__)[-1]
        detail = "%s: %s (%s line %s)" % (type(exc).__name__, exc, line.filename, line.lineno)
        write("fail " + detail.replace("\n", " ") + "\n")
        return
    write("done\n")

_checker(PROMPT, TEST, ENTRY_POINT)
"""
)

_ANSWER = (
    _CODEC
    + r"""
def _answer(source, entry_point):
    import os, sys
    out, write, lines = os.dup(1), os.write, sys.stdin
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # the program's own prints go nowhere
    os.dup2(quiet, 2)

    def send(kind, value):
        write(out, (_json.dumps([kind, value]) + "\n").encode())

    ns = {"__name__": "solution"}
    try:
        exec(compile(source, "solution.py", "exec"), ns)
        fn, setup = ns[entry_point], None
    except BaseException as exc:
        fn, setup = None, "%s: %s" % (type(exc).__name__, exc)
    for line in lines:
        try:
            if fn is None:
                raise RuntimeError("the code failed before any test ran: %s" % setup)
            args, kwargs = _json.loads(line[5:])
            send("ret", _enc(fn(*_dec(args), **_dec(kwargs))))
        except BaseException as exc:
            send("err", "%s: %s" % (type(exc).__name__, exc))

_answer(SOURCE, ENTRY_POINT)
"""
)


def new_nonce() -> str:
    """A fresh random token per run: the program cannot predict it."""
    return secrets.token_hex(16)


def function_program(source: str, fn_name: str) -> str:
    """Harness calling `fn_name` (a top-level function or a method of `class Solution`)."""
    return _FUNCTION_HARNESS.replace("SOURCE, FN_NAME", f"{source!r}, {fn_name!r}")


def checked_programs(prompt: str, source: str, test: str, entry_point: str) -> tuple[str, str]:
    """(checker, answer) programs for `tasks.relay.run_checked`: `test` (defining
    `check(candidate)`) with the prompt's helpers, against `entry_point` of `source`."""
    checker = _CHECKER.replace(
        "PROMPT, TEST, ENTRY_POINT", f"{prompt!r}, {test!r}, {entry_point!r}"
    )
    answer = _ANSWER.replace("SOURCE, ENTRY_POINT", f"{source!r}, {entry_point!r}")
    return checker, answer


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
