"""Tool use: answer a request with one function call, checked like BFCL's AST checker.

Problems come from the Berkeley Function Calling Leaderboard files shipped in the
`bfcl-eval` wheel (`source="bfcl"`, read as JSON, never imported: its dependencies are
heavy), categories `simple_python`, `multiple`, `live_simple`, `live_multiple` (one call
each), or from a JSONL/Parquet file with the same fields:

    {"id": "t1", "question": "Area of a triangle with base 10 and height 5?",
     "functions": [{"name": "triangle_area", "parameters": {"type": "dict",
        "properties": {"base": {"type": "integer"}, "height": {"type": "integer"},
                       "unit": {"type": "string"}}, "required": ["base", "height"]}}],
     "ground_truth": {"triangle_area": {"base": [10], "height": [5], "unit": ["", "units"]}}}

`question` is a string, a list of chat messages, or BFCL's one-turn list of lists;
`functions` (or BFCL's `function`) lists JSON schemas with BFCL's types (string, integer,
float, boolean, array, tuple, dict, any; JSON Schema's number and object also work);
`ground_truth` (a mapping, or BFCL's one-element list of it) gives for every argument the
list of allowed values, where "" means the argument may be left out. Inside a dict value
each key again maps to a list of allowed values.

The prompt (the last user message) shows the schemas and asks for
`{"name": ..., "arguments": {...}}`; `mopd.tasks.tool_calls` reads and checks the reply.
Reward 1.0 when every check passes, else 0.0, with the first failure as feedback.

Bundled BFCL rows that no answer can pass (an empty list of allowed values, a ground-truth
argument the schema lacks, a required argument that may only be omitted: 5 rows of v4)
are dropped and their ids kept in `ToolTask.skipped`; a user file with such a row is
refused instead, like any other bad row.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mopd.tasks.base import FixedSplits
from mopd.tasks.data import DataError, Row, field_of, load_rows, split_rows
from mopd.tasks.tool_calls import SCHEMA_TYPES, check_call, extract_call
from mopd.types import Problem, Verdict

__all__ = ["BFCL_CATEGORIES", "ToolTask"]

BFCL_CATEGORIES = ("simple_python", "multiple", "live_simple", "live_multiple")
_PROMPT = (
    "{question}\n\nAvailable functions (JSON schemas):\n{schemas}\n\nCall exactly one of "
    'them. Reply with a JSON object {{"name": "<function>", "arguments": {{...}}}}.'
)


@dataclass(frozen=True)
class ToolTask(FixedSplits):
    """One-call function-calling problems from a file or from BFCL, verified as above.

    Args:
        data: JSONL/Parquet path (`source="file"`).
        source: "file" or "bfcl".
        categories: BFCL categories to load (`source="bfcl"`): a list or a comma-separated
            string, from `BFCL_CATEGORIES`.
        n_eval: held-out problems (seeded split).
        seed: split seed.
    """

    data: str = ""
    source: str = "file"
    categories: Sequence[str] | str = ("simple_python", "multiple")
    n_eval: int = 0
    seed: int = 0
    skipped: tuple[str, ...] = field(init=False, default=(), compare=False)

    def __post_init__(self) -> None:
        if self.source not in ("file", "bfcl"):
            raise ValueError(f"ToolTask.source must be 'file' or 'bfcl', got {self.source!r}")
        if self.source == "file" and not self.data:
            raise ValueError("ToolTask.data must name a .jsonl or .parquet file (source='file')")
        raw = self.categories
        names = tuple(c.strip() for c in (raw.split(",") if isinstance(raw, str) else raw))
        unknown = [c for c in names if c not in BFCL_CATEGORIES]
        if unknown or not names:
            raise ValueError(
                f"ToolTask.categories must be a non-empty selection of {list(BFCL_CATEGORIES)}, "
                f"got {list(raw) if not isinstance(raw, str) else raw!r}"
            )
        object.__setattr__(self, "categories", names)
        if self.source == "file":
            problems = [_problem(row) for row in load_rows(self.data)]
        else:
            problems, skipped = [], []
            for row in _bfcl_rows(names):
                try:
                    problems.append(_problem(row))
                except DataError:  # a defect of the bundled data that no answer can pass
                    skipped.append(str(row.get("id")))
            object.__setattr__(self, "skipped", tuple(skipped))
        train, evals = split_rows(problems, self.n_eval, self.seed)
        self._set_splits(train, evals)

    @property
    def name(self) -> str:
        return "tool"

    def verify(self, problem: Problem, response: str) -> Verdict:
        call = extract_call(response)
        if call is None:
            return Verdict(
                0.0,
                'No function call was found; reply with {"name": ..., "arguments": {...}}.',
            )
        failure = check_call(
            call, problem.meta["functions"], problem.answer["name"], problem.answer["arguments"]
        )
        return Verdict(0.0, failure) if failure else Verdict(1.0)


def _bfcl_rows(categories: Sequence[str]) -> list[Row]:
    """Question rows of the BFCL categories, each with its `ground_truth` joined by id."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "ToolTask(source='bfcl') needs the bfcl-eval package: pip install --no-deps bfcl-eval"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    rows = []
    for category in categories:
        # The file names carry the benchmark version (BFCL_v4_...); take the newest.
        pattern = re.compile(rf"BFCL_v(\d+)_{category}\.json")
        versions = {int(m[1]): p for p in root.iterdir() if (m := pattern.fullmatch(p.name))}
        if not versions:
            raise DataError(f"{root}: no BFCL file for category {category!r}")
        questions = versions[max(versions)]
        truths = {
            row.get("id"): row for row in load_rows(root / "possible_answer" / questions.name)
        }
        for row in load_rows(questions):
            if row.get("id") not in truths:
                raise DataError(f"{row.where}: no possible answer for id {row.get('id')!r}")
            merged = Row({**row, "ground_truth": truths[row["id"]].get("ground_truth")})
            merged.source, merged.line = row.source, row.line
            rows.append(merged)
    return rows


def _problem(row: Row) -> Problem:
    messages = _messages(row)
    functions = _functions(row)
    name, allowed = _ground_truth(row, functions)
    schemas = json.dumps(list(functions.values()), ensure_ascii=False)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user] = {
        "role": "user",
        "content": _PROMPT.format(question=messages[last_user]["content"], schemas=schemas),
    }
    ident = field_of(row, "id", (str, int), optional=True)
    return Problem(
        id=str(ident if ident is not None else f"tool-{row.line}"),
        messages=tuple(messages),
        answer={"name": name, "arguments": allowed},
        meta={"functions": functions},
    )


def _messages(row: Row) -> list[dict[str, str]]:
    question = field_of(row, "question", (str, list))
    if isinstance(question, str):
        return [{"role": "user", "content": question}]
    if question and isinstance(question[0], list):  # BFCL: a list of turns
        if len(question) != 1:
            raise DataError(
                f"{row.where}: field 'question' must hold one turn, got {len(question)}"
            )
        question = question[0]
    messages = []
    for i, message in enumerate(question):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{row.where}: field 'question[{i}]' must be a message "
                '{"role": str, "content": str}'
            )
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{row.where}: field 'question' has no user message")
    return messages


def _functions(row: Row) -> dict[str, Mapping[str, Any]]:
    key = "functions" if "functions" in row or "function" not in row else "function"
    listed = field_of(row, key, (list, dict))
    functions: dict[str, Mapping[str, Any]] = {}
    for i, schema in enumerate(listed if isinstance(listed, list) else [listed]):
        where = f"{row.where}: field '{key}[{i}]'"
        if isinstance(schema, dict) and "name" not in schema and "function" in schema:
            schema = schema["function"]  # OpenAI tools: {"type": "function", "function": {...}}
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise DataError(f"{where}: must be a schema with a 'name' string")
        params = schema.get("parameters", {})
        properties = params.get("properties", {}) if isinstance(params, dict) else None
        required = params.get("required", []) if isinstance(params, dict) else None
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise DataError(
                f"{where}: 'parameters' needs a 'properties' object and a 'required' list"
            )
        missing = [r for r in required if r not in properties]
        if missing:
            raise DataError(f"{where}: required {missing} not among 'properties'")
        for name, spec in properties.items():
            _check_spec(spec, f"{where}.parameters.properties.{name}")
        if schema["name"] in functions:
            raise DataError(f"{where}: function {schema['name']!r} is listed twice")
        functions[schema["name"]] = schema
    if not functions:
        raise DataError(f"{row.where}: field {key!r} lists no function")
    return functions


def _check_spec(spec: Any, where: str) -> None:
    if not isinstance(spec, dict):
        raise DataError(f"{where}: must be an object")
    kind = spec.get("type", "any")
    if kind not in SCHEMA_TYPES:
        raise DataError(f"{where}: type {kind!r} is not one of {sorted(SCHEMA_TYPES)}")
    if isinstance(spec.get("items"), dict):
        _check_spec(spec["items"], f"{where}.items")
    for name, inner in (spec.get("properties") or {}).items():
        _check_spec(inner, f"{where}.properties.{name}")


def _ground_truth(
    row: Row, functions: Mapping[str, Mapping[str, Any]]
) -> tuple[str, dict[str, list[Any]]]:
    truth = field_of(row, "ground_truth", (dict, list))
    if isinstance(truth, list):  # BFCL: one mapping per expected call
        if len(truth) != 1 or not isinstance(truth[0], dict):
            raise DataError(f"{row.where}: field 'ground_truth' must hold exactly one call")
        truth = truth[0]
    if len(truth) != 1:
        raise DataError(f"{row.where}: field 'ground_truth' must map one function name")
    name, allowed = next(iter(truth.items()))
    if name not in functions:
        raise DataError(f"{row.where}: field 'ground_truth' names {name!r}, not in the functions")
    properties = functions[name].get("parameters", {}).get("properties", {})
    if not isinstance(allowed, dict):
        raise DataError(f"{row.where}: field 'ground_truth.{name}' must map arguments to lists")
    for arg, values in allowed.items():
        if arg not in properties:
            raise DataError(f"{row.where}: field 'ground_truth.{name}.{arg}' is not a parameter")
        if not isinstance(values, list) or not values:
            raise DataError(
                f"{row.where}: field 'ground_truth.{name}.{arg}' must be a non-empty list "
                'of allowed values ("" = may be omitted)'
            )
    for arg in functions[name].get("parameters", {}).get("required", []):
        if all(value == "" for value in allowed.get(arg, [""])):
            raise DataError(
                f"{row.where}: field 'ground_truth.{name}': the required argument {arg!r} "
                "has no allowed value"
            )
    return name, dict(allowed)
