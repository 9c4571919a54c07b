"""Reading a function call from a reply and checking it, in the spirit of BFCL's AST checker.

Reading: the call is the one that ends last in the reply, either a JSON object
`{"name": ..., "arguments": {...}}` (also inside `<tool_call>` tags, a list, or with
the arguments as a JSON string, OpenAI style) or a Python call `f(a=1, b="x")`, parsed
with `ast` and its values read with `ast.literal_eval`: nothing is ever run.

Checking, in BFCL's order, the first failure decides: the function name; every required
argument present; no argument outside the schema or the ground truth; each value's type
against the schema (an int is accepted for float, a bool is never a number, arrays and
dicts are checked at every depth); each value among the allowed ones (strings compared
after lower-casing and dropping whitespace and ,./-_*^ as BFCL does, lists element by
element, dicts key by key, numbers by value); finally every argument the ground truth
needs is present. As in BFCL, a value the ground truth lists with the very same Python
type passes even where the schema's type disagrees (the data lists null for optional
strings, for example).

Deviations from BFCL: "any" accepts every type (BFCL reads it as str), types are checked
at every depth (BFCL: one level), an explicit "" is not a value for an optional argument
(it is only the omission marker), and arguments passed by position are rejected.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SCHEMA_TYPES", "ToolCall", "check_call", "extract_call"]

# Schema type -> accepted Python types of a JSON value; None accepts anything.
SCHEMA_TYPES: dict[str, tuple[type, ...] | None] = {
    "string": (str,),
    "integer": (int,),
    "float": (int, float),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "tuple": (list,),
    "dict": (dict,),
    "object": (dict,),
    "any": None,
}
_JSON_NAMES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
_IGNORED = re.compile(r"[\s,./\-_*^]")  # what BFCL's string comparison disregards
_CALL_START = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\(")


@dataclass(frozen=True)
class ToolCall:
    """A function call read from a reply; `positional` counts arguments passed by position."""

    name: str
    arguments: Mapping[str, Any]
    positional: int = 0


def extract_call(response: str) -> ToolCall | None:
    """The call that ends last in `response` (JSON object or Python call form), or None."""
    found = _json_calls(response) + _python_calls(response)  # (end offset, call)
    return max(found, key=lambda ended: ended[0])[1] if found else None


def check_call(
    call: ToolCall,
    functions: Mapping[str, Mapping[str, Any]],
    expected: str,
    allowed: Mapping[str, Sequence[Any]],
) -> str | None:
    """None if `call` passes every check, else the first failure, worded for the model.

    `functions` maps names to schemas, `expected` is the function to call and `allowed`
    maps its arguments to their allowed values ("" = may be omitted). The message never
    contains an expected value or the expected function's name: with environment
    feedback on, the teacher reads it, and a teacher told the answer produces targets
    the student cannot reach from the question (the ground truth would leak into training).
    """
    if call.positional:
        return "Pass every argument by name, e.g. f(x=1), not by position."
    if call.name not in functions:
        return f"There is no function named {call.name!r}."
    if call.name != expected:
        return f"{call.name!r} is not the function this request needs."
    params = functions[call.name].get("parameters", {})
    properties: Mapping[str, Any] = params.get("properties", {})
    for name in params.get("required", []):
        if name not in call.arguments:
            return f"The required argument {name!r} is missing."
    for name, value in call.arguments.items():
        if name not in properties:
            return f"{call.name!r} has no parameter {name!r}."
        if name not in allowed:
            return f"The argument {name!r} does not belong in this call."
        listed_types = {type(gold) for gold in allowed[name] if gold != ""}
        if type(value) in listed_types and _is_allowed(value, allowed[name]):
            continue  # listed verbatim: passes even where the schema's type disagrees
        wrong_type = _type_error(name, value, properties[name])
        if wrong_type:
            return wrong_type
        if not _is_allowed(value, allowed[name]):
            return f"The value of argument {name!r} is wrong."
    for name, values in allowed.items():
        if name not in call.arguments and "" not in values:
            return f"The argument {name!r} is needed for this request but was left out."
    return None


def _type_error(path: str, value: Any, spec: Mapping[str, Any]) -> str | None:
    accepted = SCHEMA_TYPES.get(str(spec.get("type", "any")))
    if accepted is None:
        return None
    # bool is an int in Python, but true is not a number in a call.
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
        got = "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)
        return f"The argument {path!r} must be of type {spec['type']}, got {got}."
    items = spec.get("items")
    if isinstance(value, list) and isinstance(items, Mapping):
        for i, item in enumerate(value):
            error = _type_error(f"{path}[{i}]", item, items)
            if error:
                return error
    properties = spec.get("properties")
    if isinstance(value, dict) and isinstance(properties, Mapping):
        for key, item in value.items():
            if key in properties:
                error = _type_error(f"{path}.{key}", item, properties[key])
                if error:
                    return error
    return None


def _is_allowed(value: Any, alternatives: Any) -> bool:
    """`value` equals one of `alternatives` ("" is the omission marker, never a value)."""
    options = alternatives if isinstance(alternatives, list) else [alternatives]
    return any(option != "" and _same(value, option) for option in options)


def _same(value: Any, gold: Any) -> bool:
    if isinstance(gold, str):
        return isinstance(value, str) and _normal(value) == _normal(gold)
    if isinstance(gold, bool) or isinstance(value, bool):
        return isinstance(gold, bool) and isinstance(value, bool) and gold == value
    if isinstance(gold, (int, float)):
        return isinstance(value, (int, float)) and value == gold
    if isinstance(gold, list):
        return (
            isinstance(value, list)
            and len(value) == len(gold)
            and all(_same(v, g) for v, g in zip(value, gold, strict=True))
        )
    if isinstance(gold, dict):  # each key of a gold dict lists its allowed values
        return (
            isinstance(value, dict)
            and all(k in gold and _is_allowed(v, gold[k]) for k, v in value.items())
            and all(k in value or "" in _as_list(g) for k, g in gold.items())
        )
    return bool(value == gold)


def _normal(text: str) -> str:
    return _IGNORED.sub("", text).lower().replace("'", '"')


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _json_calls(text: str) -> list[tuple[int, ToolCall]]:
    decoder, found = json.JSONDecoder(), []
    start = text.find("{")
    while start >= 0:
        try:
            obj, end = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            obj, end = None, start
        call = _as_call(obj)
        if call is not None:
            found.append((end, call))
        # After a call skip past it; otherwise look inside (e.g. {"tool_call": {...}}).
        start = text.find("{", end if call is not None else start + 1)
    return found


def _as_call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters"))
    if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return None
    return ToolCall(obj["name"], arguments) if isinstance(arguments, dict) else None


def _python_calls(text: str) -> list[tuple[int, ToolCall]]:
    found = []
    for match in _CALL_START.finditer(text):
        end = _closing_paren(text, match.end() - 1)
        if end is None:
            continue
        call = _parse_python_call(text[match.start() : end])
        if call is not None:
            found.append((end, call))
    return found


def _closing_paren(text: str, open_at: int) -> int | None:
    """Offset just past the bracket closing `text[open_at]`, skipping string literals."""
    depth, quote, i = 0, "", open_at
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _parse_python_call(source: str) -> ToolCall | None:
    try:
        node = ast.parse(source, mode="eval").body
        if not isinstance(node, ast.Call) or any(kw.arg is None for kw in node.keywords):
            return None
        name = _dotted(node.func)
        arguments = {kw.arg: _jsonish(ast.literal_eval(kw.value)) for kw in node.keywords if kw.arg}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    return None if name is None else ToolCall(name, arguments, positional=len(node.args))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _jsonish(value: Any) -> Any:
    """Tuples become lists, as in JSON; other literals stay (a set then fails the type check)."""
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    return value
