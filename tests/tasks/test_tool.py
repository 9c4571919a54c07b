"""The tool-call task: reading calls from replies, BFCL-style checks, and its data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mopd.tasks import build_task
from mopd.tasks.data import DataError
from mopd.tasks.tool import BFCL_CATEGORIES, ToolTask
from mopd.tasks.tool_calls import ToolCall, check_call, extract_call

pytestmark = pytest.mark.unit

TRIANGLE = {
    "name": "geometry.triangle_area",
    "description": "Area of a triangle.",
    "parameters": {
        "type": "dict",
        "properties": {
            "base": {"type": "integer"},
            "height": {"type": "integer"},
            "unit": {"type": "string"},
            "scale": {"type": "float"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "options": {"type": "dict", "properties": {"precision": {"type": "integer"}}},
            "verbose": {"type": "boolean"},
        },
        "required": ["base", "height"],
    },
}
CIRCLE = {
    "name": "circle_area",
    "parameters": {"type": "dict", "properties": {"radius": {"type": "float"}}, "required": []},
}
ROW = {
    "id": "tri",
    "question": "Area of a small right triangle, base 10 and height 5, in centimetres?",
    "functions": [TRIANGLE, CIRCLE],
    "ground_truth": {
        "geometry.triangle_area": {
            "base": [10],
            "height": [5],
            "unit": ["cm", "centimetres"],  # not required by the schema, but needed here
            "scale": ["", 2.0],
            "tags": ["", ["right", "small"]],
            "options": ["", {"precision": [3]}],
        }
    },
}
GOLD_STRINGS = ("10", "centimetres", "'cm'", "right", "precision': [3")


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _reply(**arguments: Any) -> str:
    return json.dumps({"name": "geometry.triangle_area", "arguments": arguments})


@pytest.fixture
def task(tmp_path) -> ToolTask:
    built = build_task("tool", {"data": _jsonl(tmp_path / "tools.jsonl", [ROW])})
    assert isinstance(built, ToolTask)
    return built


@pytest.mark.parametrize(
    "reply",
    [
        _reply(base=10, height=5, unit="cm"),  # optional arguments left out
        _reply(base=10, height=5, unit=" Centi-Metres."),  # case, space, punctuation
        _reply(base=10, height=5, unit="cm", scale=2),  # an int where a float belongs
        _reply(base=10, height=5, unit="cm", scale=2.0, tags=["Right", "small"]),
        _reply(base=10, height=5, unit="cm", options={"precision": 3}),
        'I will call it.\n```json\n{"name": "geometry.triangle_area", "arguments": '
        '{"base": 10, "height": 5, "unit": "cm"}}\n```',
        '<tool_call>{"name": "geometry.triangle_area", '
        '"arguments": "{\\"base\\": 10, \\"height\\": 5, \\"unit\\": \\"cm\\"}"}</tool_call>',
        "geometry.triangle_area(base=10, height=5, unit='cm')",
        "[geometry.triangle_area(height=5, base=10, unit='cm', tags=('right', 'small'))]",
        # only the last call counts
        "circle_area(radius=1.0) no, rather: geometry.triangle_area(base=10, height=5, unit='cm')",
    ],
)
def test_correct_calls_in_either_format_score_one(task, reply):
    verdict = task.verify(task.train_problems()[0], reply)
    assert (verdict.reward, verdict.feedback) == (1.0, None)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ('{"name": "circle_area", "arguments": {"radius": 1.0}}', "not the function"),
        ('{"name": "triangle_area", "arguments": {"base": 10}}', "no function named"),
        (_reply(base=10, unit="cm"), "required argument 'height' is missing"),
        (_reply(base=10, height=5, unit="cm", color="red"), "no parameter 'color'"),
        (_reply(base=10, height=5, unit="cm", verbose=True), "'verbose' does not belong"),
        (_reply(base="10", height=5, unit="cm"), "'base' must be of type integer, got string"),
        (_reply(base=10.0, height=5, unit="cm"), "'base' must be of type integer, got float"),
        (_reply(base=True, height=5, unit="cm"), "'base' must be of type integer, got boolean"),
        (_reply(base=10, height=5, unit="cm", scale="2"), "'scale' must be of type float"),
        (_reply(base=10, height=5, unit="cm", tags=[1]), "'tags[0]' must be of type string"),
        (_reply(base=10, height=5, unit="cm", options={"precision": "3"}), "'options.precision'"),
        (_reply(base=11, height=5, unit="cm"), "value of argument 'base' is wrong"),
        (_reply(base=10, height=5, unit="inches"), "value of argument 'unit' is wrong"),
        (_reply(base=10, height=5, unit="c m s"), "value of argument 'unit' is wrong"),
        (_reply(base=10, height=5, unit=""), "value of argument 'unit' is wrong"),
        (_reply(base=10, height=5, unit="cm", scale=2.5), "value of argument 'scale'"),
        (_reply(base=10, height=5, unit="cm", tags=["small", "right"]), "value of argument 'tags'"),
        (_reply(base=10, height=5, unit="cm", tags=["right"]), "value of argument 'tags'"),
        (_reply(base=10, height=5, unit="cm", options={"precision": 4}), "argument 'options'"),
        (_reply(base=10, height=5, unit="cm", options={"digits": 3}), "argument 'options'"),
        (_reply(base=10, height=5), "'unit' is needed"),
        ("geometry.triangle_area(10, 5, unit='cm')", "by name"),
        ('{"name": "geometry.triangle_area", "arguments": {"base": 10, "height": 5', "No function"),
        ("The area is 25 square centimetres.", "No function call"),
        ("geometry.triangle_area(base=10, height=5, unit=cm)", "No function call"),  # not a literal
        # a later wrong call overrides an earlier right one
        (_reply(base=10, height=5, unit="cm") + " or circle_area(radius=2.0)", "not the function"),
    ],
)
def test_each_failed_check_scores_zero_and_says_why_without_the_answer(task, reply, why):
    verdict = task.verify(task.train_problems()[0], reply)
    assert verdict.reward == 0.0
    assert verdict.feedback is not None and why in verdict.feedback
    assert not any(gold in verdict.feedback for gold in GOLD_STRINGS)
    if why in ("not the function", "no function named"):  # nor the function to call
        assert "geometry" not in verdict.feedback


CONDITIONS = {
    "type": "array",
    "items": {
        "type": "dict",
        "properties": {"field": {"type": "string"}, "value": {"type": "string"}},
    },
}
QUERY = {"query": {"parameters": {"properties": {"conditions": CONDITIONS}, "required": []}}}
ALLOWED = {
    "conditions": [
        [{"field": ["age"], "value": ["25"]}, {"field": ["job"], "value": ["engineer", "eng"]}]
    ]
}


@pytest.mark.parametrize(
    ("conditions", "passes"),
    [
        ([{"field": "Age", "value": "25"}, {"field": "job", "value": "eng"}], True),
        ([{"field": "job", "value": "eng"}, {"field": "age", "value": "25"}], False),  # order
        ([{"field": "age", "value": "25"}], False),  # one dict short
        ([{"field": "age", "value": "25"}, {"field": "job"}], False),  # key left out
        ([{"field": "age", "value": "25", "op": ">"}, {"field": "job", "value": "eng"}], False),
        ([{"field": "age", "value": "26"}, {"field": "job", "value": "eng"}], False),
    ],
)
def test_lists_of_dicts_are_compared_key_by_key_and_in_order(conditions, passes):
    failure = check_call(ToolCall("query", {"conditions": conditions}), QUERY, "query", ALLOWED)
    assert (failure is None) == passes


def test_nested_type_errors_name_the_path():
    call = ToolCall("query", {"conditions": [{"field": 1, "value": "25"}]})
    failure = check_call(call, QUERY, "query", ALLOWED)
    assert failure == "The argument 'conditions[0].field' must be of type string, got integer."


def test_a_value_listed_verbatim_passes_even_against_the_schema_type():
    # BFCL lists null among the allowed values of some optional string arguments.
    schema = {"f": {"parameters": {"properties": {"s": {"type": "string"}}, "required": []}}}
    assert check_call(ToolCall("f", {"s": None}), schema, "f", {"s": ["", None]}) is None
    failure = check_call(ToolCall("f", {"s": None}), schema, "f", {"s": ["", "x"]})
    assert failure == "The argument 's' must be of type string, got null."


def test_python_calls_are_parsed_not_run(tmp_path):
    marker = tmp_path / "ran"
    hostile = f"f(x=__import__('pathlib').Path({str(marker)!r}).touch())"
    call = extract_call(hostile)
    assert call is None or call.name != "f"  # only inner calls with literal arguments count
    assert not marker.exists()
    call = extract_call('Use a.b.f(s="a)b", t=(1, -2.5), d={"k": [None, True]}) here.')
    assert call == ToolCall("a.b.f", {"s": "a)b", "t": [1, -2.5], "d": {"k": [None, True]}})


def test_json_calls_are_found_inside_wrappers_and_lists():
    text = 'x {"tool_call": [{"name": "f", "parameters": {"a": 1}}]} y'
    assert extract_call(text) == ToolCall("f", {"a": 1})
    assert extract_call('{"name": "f", "arguments": [1]}') is None  # arguments not an object
    assert extract_call("{" * 5000) is None


def test_bfcl_data_loads_and_its_own_answers_pass():
    task = ToolTask(source="bfcl", categories=",".join(BFCL_CATEGORIES), n_eval=10)
    problems = [*task.train_problems(), *task.eval_problems()]
    assert len(problems) > 1500 and len(task.eval_problems()) == 10
    assert len({p.id for p in problems}) == len(problems)
    assert len(task.skipped) <= 10  # known defects of the bundled data only
    for problem in problems:
        name, allowed = problem.answer["name"], problem.answer["arguments"]
        assert name in problem.question and name in problem.meta["functions"]
        arguments = {k: _first(v) for k, v in allowed.items() if any(x != "" for x in v)}
        as_json = json.dumps({"name": name, "arguments": arguments})
        as_python = f"[{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})]"
        assert task.verify(problem, as_json).reward == 1.0, problem.id
        assert task.verify(problem, as_python).reward == 1.0, problem.id


def _first(alternatives: Any) -> Any:
    """A concrete value from a list of allowed ones (dict keys map to such lists too)."""
    options = alternatives if isinstance(alternatives, list) else [alternatives]
    return _concrete(next(a for a in options if a != ""))


def _concrete(value: Any) -> Any:
    if isinstance(value, list):
        return [_concrete(v) for v in value]
    if isinstance(value, dict):
        return {k: _first(v) for k, v in value.items() if v != [""]}
    return value


def test_default_categories_are_the_offline_python_ones():
    task = ToolTask(source="bfcl")
    assert task.categories == ("simple_python", "multiple")
    assert {p.id.rsplit("_", 1)[0] for p in task.train_problems()} == {"simple_python", "multiple"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"source": "hub"}, "ToolTask.source must be 'file' or 'bfcl'"),
        ({"source": "file"}, "ToolTask.data must name"),
        ({"source": "bfcl", "categories": ["parallel"]}, "ToolTask.categories must be"),
        ({"source": "bfcl", "categories": []}, "ToolTask.categories must be"),
    ],
)
def test_bad_options_name_the_field_and_allowed_values(options, message):
    with pytest.raises(ValueError, match=message):
        ToolTask(**options)


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in ROW.items() if k != key}


def _truth(**arguments: Any) -> dict[str, Any]:
    return {**ROW, "ground_truth": {"geometry.triangle_area": {"base": [10], **arguments}}}


BAD_ROWS = [
    (_without("ground_truth"), "field 'ground_truth' is missing"),
    ({**ROW, "question": 3}, "field 'question': expected str/list, got int"),
    ({**ROW, "question": [{"role": "system", "content": "x"}]}, "has no user message"),
    ({**ROW, "functions": [{"description": "no name"}]}, "field 'functions[0]'"),
    (
        {**ROW, "functions": [{"name": "f", "parameters": {"properties": {}, "required": ["a"]}}]},
        "required ['a'] not among 'properties'",
    ),
    (
        {**ROW, "functions": [{"name": "f", "parameters": {"properties": {"a": {"type": "cx"}}}}]},
        "field 'functions[0]'.parameters.properties.a: type 'cx'",
    ),
    ({**ROW, "ground_truth": {"area": {}}}, "names 'area', not in the functions"),
    (_truth(height=[5], depth=[1]), "field 'ground_truth.geometry.triangle_area.depth'"),
    (_truth(height=5), "'ground_truth.geometry.triangle_area.height' must be a non-empty list"),
    (_truth(height=[""]), "required argument 'height' has no allowed value"),
    ({**ROW, "ground_truth": [{}, {}]}, "must hold exactly one call"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_ROWS)
def test_bad_rows_are_refused_with_file_line_and_field(tmp_path, bad, message):
    data = _jsonl(tmp_path / "tools.jsonl", [ROW, bad])
    with pytest.raises(DataError) as caught:
        ToolTask(data=data)
    assert f"{data}:2: " in str(caught.value)
    assert message in str(caught.value)


def test_bfcl_rows_and_openai_tool_schemas_load_from_a_user_file(tmp_path):
    bfcl_style = {
        "id": "b1",
        "question": [[{"role": "system", "content": "Be brief."}, ROW["question"]]],
        "function": [{"type": "function", "function": CIRCLE}],
        "ground_truth": [{"circle_area": {"radius": [2.0]}}],
    }
    bfcl_style["question"][0][1] = {"role": "user", "content": "Area of a circle of radius 2?"}
    task = ToolTask(data=_jsonl(tmp_path / "b.jsonl", [bfcl_style]))
    problem = task.train_problems()[0]
    assert [m["role"] for m in problem.messages] == ["system", "user"]
    assert task.verify(problem, "circle_area(radius=2)").reward == 1.0
