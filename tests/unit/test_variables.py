"""Shared variables without a broker: types, constraints, records, scopes, the store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dspex.agents.runtime.modules import MODULE_TYPES as AGENT_MODULE_TYPES
from dspex.schemas.samples import sample
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.variables import (
    MODULE_TYPES,
    VAR_TYPES,
    VariableStore,
    new_update,
    parse_value,
    scope_ref_for,
    validate_update,
    variable_key,
)


def refused(field: str, match: str = "") -> Any:
    """``pytest.raises`` for an InvalidRequest naming ``field``."""
    return pytest.raises(InvalidRequest, match=f"field={field}: .*{match}")


def test_module_types_match_the_agents_list() -> None:
    assert set(MODULE_TYPES) == set(AGENT_MODULE_TYPES)


# --- types and constraints -----------------------------------------------------------

ACCEPTED = [
    ("float", "0.5", {"min": 0, "max": 1}, 0.5),
    ("float", "2", {}, 2),
    ("int", "7", {"min": 1, "max": 10}, 7),
    ("int", str(10**30), {}, 10**30),
    ("bool", "true", {}, True),
    ("probability", "0", {}, 0),
    ("probability", "0.25", {"max": 0.5}, 0.25),
    ("choice", '"b"', {"choices": ["a", "b"]}, "b"),
    ("choice", "2", {"choices": [1, 2.0]}, 2),
    ("module", '"ChainOfThought"', {}, "ChainOfThought"),
    ("module", '"Predict"', {"choices": ["Predict", "ReAct"]}, "Predict"),
    ("string", '"hello"', {"max_length": 5, "pattern": "h.*o"}, "hello"),
    ("embedding", "[0.1, 0.2, 0.3]", {"dims": 3}, [0.1, 0.2, 0.3]),
    ("tensor", "[[1, 2, 3], [4, 5, 6]]", {"shape": [2, 3]}, [[1, 2, 3], [4, 5, 6]]),
    ("tensor", "3.5", {"shape": []}, 3.5),
    (
        "composite",
        '{"k": 3, "style": "terse", "extra": null}',
        {"fields": {"k": {"type": "int", "min": 1}, "style": {"type": "string"}}},
        {"k": 3, "style": "terse", "extra": None},
    ),
    ("float", "0.5", {"when": {"model": ["gpt", "local"]}}, 0.5),
]


@pytest.mark.parametrize(("var_type", "value_json", "constraints", "expected"), ACCEPTED)
def test_valid_values_decode(
    var_type: str, value_json: str, constraints: dict[str, Any], expected: Any
) -> None:
    assert parse_value(var_type, value_json, constraints) == expected


def test_every_type_has_an_accepted_example() -> None:
    assert {case[0] for case in ACCEPTED} == set(VAR_TYPES)


REFUSED_VALUES = [
    ("float", "NaN", {}, "invalid JSON"),
    ("float", "Infinity", {}, "invalid JSON"),
    ("float", "1e999", {}, "infinity"),
    ("float", '"0.5"', {}, "finite number"),
    ("float", "true", {}, "finite number"),
    ("float", "1.5", {"max": 1}, "above the maximum 1"),
    ("float", "-1", {"min": 0}, "below the minimum 0"),
    ("int", "1.5", {}, "integer"),
    ("int", "11", {"max": 10}, "above the maximum"),
    ("bool", "1", {}, "true or false"),
    ("probability", "1.01", {}, r"\[0, 1\]"),
    ("probability", "0.75", {"max": 0.5}, "above the maximum"),
    ("choice", '"c"', {"choices": ["a", "b"]}, "not one of the choices"),
    ("module", '"Magic"', {}, "not a module type"),
    ("module", '"ReAct"', {"choices": ["Predict"]}, "not one of the choices"),
    ("string", "5", {}, "must be a string"),
    ("string", '"toolong"', {"max_length": 3}, "over max_length 3"),
    ("string", '"abc"', {"pattern": "[0-9]+"}, "does not match"),
    ("embedding", "[]", {}, "non-empty list"),
    ("embedding", '[0.1, "x"]', {}, "finite numbers"),
    ("embedding", "[0.1, 0.2]", {"dims": 3}, "expected dims 3"),
    ("tensor", "[[1, 2], [3]]", {}, "ragged"),
    ("tensor", "[[1, 2], [3, 4]]", {"shape": [4]}, r"expected \[4\]"),
    ("tensor", '["a"]', {}, "numbers"),
    ("composite", "[1]", {}, "JSON object"),
    ("float", "{", {}, "invalid JSON"),
]


@pytest.mark.parametrize(("var_type", "value_json", "constraints", "match"), REFUSED_VALUES)
def test_invalid_values_name_value_json(
    var_type: str, value_json: str, constraints: dict[str, Any], match: str
) -> None:
    with refused("value_json", match):
        parse_value(var_type, value_json, constraints)


def test_composite_members_are_checked_and_named() -> None:
    fields = {"fields": {"k": {"type": "int", "max": 5}, "p": {"type": "probability"}}}
    with refused("value_json.k", "above the maximum 5"):
        parse_value("composite", '{"k": 9, "p": 0.1}', fields)
    with refused("value_json.p", "is missing"):
        parse_value("composite", '{"k": 1}', fields)
    nested = {"fields": {"inner": {"type": "composite", "fields": {"x": {"type": "bool"}}}}}
    with refused("value_json.inner.x", "true or false"):
        parse_value("composite", '{"inner": {"x": 0}}', nested)


REFUSED_CONSTRAINTS = [
    ("float", {"choices": [1]}, "unknown key 'choices'"),
    ("float", {"min": 2, "max": 1}, "greater than max"),
    ("float", {"min": "0"}, "finite number"),
    ("probability", {"max": 2}, r"\[0, 1\]"),
    ("choice", {}, "needs choices"),
    ("choice", {"choices": []}, "non-empty list"),
    ("module", {"choices": ["Predict", "Magic"]}, "not module types"),
    ("string", {"pattern": "("}, "not a regular expression"),
    ("string", {"max_length": -1}, "max_length"),
    ("embedding", {"dims": 0}, "dims"),
    ("tensor", {"shape": [2, "x"]}, "shape"),
    ("composite", {"fields": {"a": {"type": "nope"}}}, "fields.a needs a type"),
    ("composite", {"fields": {"a": {"type": "int", "when": {"m": [1]}}}}, "whole variables"),
    ("float", {"when": {"model": "gpt"}}, "non-empty list"),
    ("float", {"when": {"bad name": [1]}}, "not a variable name"),
    ("float", {"when": {}}, "when must be an object"),
]


@pytest.mark.parametrize(("var_type", "constraints", "match"), REFUSED_CONSTRAINTS)
def test_malformed_constraints_name_constraints_json(
    var_type: str, constraints: dict[str, Any], match: str
) -> None:
    with refused("constraints_json", match):
        parse_value(var_type, "0", constraints)


def test_unknown_type_names_var_type() -> None:
    with refused("var_type", "unknown type 'decimal'"):
        parse_value("decimal", "1", {})


# --- records -------------------------------------------------------------------------


def test_keys_per_scope() -> None:
    assert variable_key("temperature") == "temperature"
    assert variable_key("temperature", "program", "qa") == "program/qa/temperature"
    assert variable_key("k", "module", "qa/ChainOfThought") == "module/qa/ChainOfThought/k"
    with refused("scope_ref", "<program_id>/<module>"):
        variable_key("k", "module", "qa")
    with refused("scope_ref", "null for a global"):
        variable_key("k", "global", "qa")
    with refused("scope", "unknown scope"):
        variable_key("k", "team", "qa")


def test_scope_refs_from_program_and_module() -> None:
    assert scope_ref_for("global", None, None) is None
    assert scope_ref_for("program", "qa", None) == "qa"
    assert scope_ref_for("module", "qa", "Predict") == "qa/Predict"
    with refused("scope", "program was named for a global"):
        scope_ref_for("global", "qa", None)
    with refused("scope_ref", "needs a module"):
        scope_ref_for("module", "qa", None)
    with refused("scope_ref", "<program_id>"):
        scope_ref_for("program", "a/b", None)


def test_new_update_versions_and_defaults_from_previous() -> None:
    first = new_update(
        "temperature",
        0.7,
        var_type="float",
        constraints={"min": 0, "max": 2},
        scope="program",
        scope_ref="qa",
        updated_by="ana",
        reason="start warm",
        observers=["qa"],
    )
    assert (first["version"], first["previous_value_json"], first["value_json"]) == (1, None, "0.7")
    second = new_update(
        "temperature", 0.2, scope="program", scope_ref="qa", previous=first, reason="colder"
    )
    assert second["version"] == 2 and second["previous_value_json"] == "0.7"
    assert (second["var_type"], json.loads(second["constraints_json"])) == (
        "float",
        {"min": 0, "max": 2},
    )
    assert second["observers"] == ["qa"]
    retyped = new_update(
        "temperature", "hot", var_type="string", scope="program", scope_ref="qa", previous=second
    )
    assert (retyped["constraints_json"], retyped["version"]) == ("{}", 3)
    with refused("value_json", "above the maximum 2"):
        new_update("temperature", 3, scope="program", scope_ref="qa", previous=second)
    with refused("name", "previous record"):
        new_update("temperature", 0.1, previous=second)
    with refused("var_type", "needs a type"):
        new_update("fresh", 1)
    with refused("value_json", "not JSON-serializable"):
        new_update("x", float("nan"), var_type="float")


def test_new_update_record_is_valid_avro() -> None:
    serde = make_serde(Settings())
    record = new_update("model", "gpt", var_type="choice", constraints={"choices": ["gpt"]})
    back = serde.decode(serde.encode("VariableUpdate", record, topic="t"), topic="t").record
    assert back == record


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "has space"}, "name"),
        ({"name": "a/b"}, "name"),
        ({"var_type": "decimal"}, "var_type"),
        ({"scope": "team"}, "scope"),
        ({"scope": "program", "scope_ref": None}, "scope_ref"),
        ({"version": 0}, "version"),
        ({"version": True}, "version"),
        ({"constraints_json": "[1]"}, "constraints_json"),
        ({"constraints_json": "{"}, "constraints_json"),
        ({"value_json": "NaN"}, "value_json"),
        ({"previous_value_json": "{"}, "previous_value_json"),
        ({"observers": [""]}, "observers"),
        ({"name": "module", "var_type": "string", "value_json": '"x"'}, "var_type"),
    ],
)
def test_validate_update_names_the_bad_field(change: dict[str, Any], field: str) -> None:
    record = {**sample("VariableUpdate"), **change}
    with refused(field):
        validate_update(record)


def test_sample_record_is_valid() -> None:
    assert validate_update(sample("VariableUpdate")) == 0.2


# --- the store -----------------------------------------------------------------------


def update(
    name: str,
    value: Any,
    var_type: str = "float",
    *,
    program: str | None = None,
    module: str | None = None,
    version: int = 1,
    **constraints: Any,
) -> tuple[str, dict[str, Any]]:
    scope = "module" if module else "program" if program else "global"
    ref = scope_ref_for(scope, program, module)
    record = new_update(
        name, value, var_type=var_type, constraints=constraints, scope=scope, scope_ref=ref
    )
    record["version"] = version
    return variable_key(name, scope, ref), record


def store_of(*updates: tuple[str, dict[str, Any]]) -> VariableStore:
    store = VariableStore()
    for key, record in updates:
        assert store.apply(key, record) is None
    return store


def test_resolve_precedence_global_program_module() -> None:
    store = store_of(
        update("temperature", 0.7),
        update("temperature", 0.3, program="qa"),
        update("temperature", 0.0, program="qa", module="ChainOfThought"),
        update("max_tokens", 200, "int"),
    )
    assert store.resolve(None) == {"temperature": "0.7", "max_tokens": "200"}
    assert store.resolve("other") == {"temperature": "0.7", "max_tokens": "200"}
    assert store.resolve("qa") == {"temperature": "0.3", "max_tokens": "200"}
    assert store.resolve("qa", "Predict")["temperature"] == "0.3"
    assert store.resolve("qa", "ChainOfThought")["temperature"] == "0.0"


def test_when_conditions_follow_the_other_variables_effective_value() -> None:
    store = store_of(
        update("model", "small", "choice", choices=["small", "large"]),
        update("top_p", 0.9, when={"model": ["large"]}),
        update("top_p", 0.5, program="qa", when={"model": ["small"]}),
    )
    assert "top_p" not in store.resolve(None)
    assert store.resolve("qa")["top_p"] == "0.5"
    assert store.resolve(None, context={"model": '"large"'})["top_p"] == "0.9"
    # the program's conditional value does not apply: fall through to the global one
    assert store.resolve("qa", context={"model": ' "large" '})["top_p"] == "0.9"
    store.apply(*update("model", "large", "choice", version=2, choices=["small", "large"]))
    assert store.resolve("qa") == {"model": '"large"', "top_p": "0.9"}


def test_when_conditions_chain_and_cycles_apply_nothing() -> None:
    store = store_of(
        update("a", 1, "int"),
        update("b", 2, "int", when={"a": [1.0]}),
        update("c", 3, "int", when={"b": [2]}),
        update("x", 1, "int", when={"y": [1]}),
        update("y", 1, "int", when={"x": [1]}),
    )
    assert store.resolve(None) == {"a": "1", "b": "2", "c": "3"}


def test_store_keeps_last_good_value_on_invalid_or_old_record() -> None:
    key, good = update("temperature", 0.3, program="qa", version=2, min=0, max=1)
    store = store_of((key, good))
    bad = {**good, "version": 3, "value_json": "7"}
    error = store.apply(key, bad)
    assert isinstance(error, InvalidRequest) and error.field == "value_json"
    old = {**good, "version": 2, "value_json": "0.9"}
    error = store.apply(key, old)
    assert isinstance(error, InvalidRequest) and error.field == "version"
    assert "not newer" in error.reason
    error = store.apply("temperature", {**good, "version": 4})
    assert isinstance(error, InvalidRequest) and error.field == "key"
    assert store.get(key) == good
    assert store.resolve("qa") == {"temperature": "0.3"}
    assert store.apply(key, {**good, "version": 5, "value_json": "0.4"}) is None
    assert store.resolve("qa") == {"temperature": "0.4"}


def test_tombstone_deletes_and_records_list_what_is_in_force() -> None:
    global_key, global_record = update("temperature", 0.7)
    program_key, program_record = update("temperature", 0.1, program="qa")
    store = store_of((global_key, global_record), (program_key, program_record))
    assert [r["scope"] for r in store.records()] == ["program", "global"]
    assert store.apply(program_key, None) is None
    assert store.resolve("qa") == {"temperature": "0.7"}
    assert store.get(program_key) is None
    assert store.apply(global_key, None) is None
    assert store.resolve("qa") == {} and store.records() == []


def test_cli_values_are_json_or_bare_text() -> None:
    from dspex.streams.cli.variables import parse_value_text

    assert parse_value_text("0.5", "float") == 0.5
    assert parse_value_text("warm", "float") == "warm"  # then refused as not a number
    assert parse_value_text("123", "string") == "123"
    assert parse_value_text('"quoted"', "string") == "quoted"
    assert parse_value_text("ChainOfThought", "module") == "ChainOfThought"
    assert parse_value_text("2", "choice") == 2
    assert parse_value_text("[1, 2]", None) == [1, 2]
