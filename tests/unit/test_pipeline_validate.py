"""Pipeline validation: every problem found, each naming its stage and path."""

from __future__ import annotations

from typing import Any

import pytest

from dspex.streams.pipelines.problems import InvalidPipeline
from dspex.streams.pipelines.spec import Condition, Pipeline, Stage
from dspex.streams.pipelines.validate import assignable, check, validate

PROGRAMS = {
    "search": "query -> passages: list[str], found: bool",
    "classify": "question -> label, score: float",
    "count": "n: int -> total: int",
}


def paths(pipeline: Pipeline, programs: Any = PROGRAMS) -> dict[str, str]:
    """path -> message of every problem (a test pipeline has one problem per path)."""
    found = validate(pipeline, programs)
    assert len({p.path for p in found}) == len(found), found
    return {p.path: p.message for p in found}


def good() -> Pipeline:
    return (
        Pipeline("support", inputs="question, topics: list[str], n: int")
        .stage("retrieve", program="search", inputs={"query": "$input.question"}, pool="gpu")
        .stage("classify", program="classify", inputs={"question": "$input.question"})
        .stage(
            "summarize",
            signature="topic, passages: list[str] -> summary, score: float",
            inputs={"topic": "$item", "passages": "$stage.retrieve.passages"},
            map_over="$input.topics",
            concurrency=4,
            when={"ref": "$stage.classify.label", "values": ["billing", "refund"]},
            optional=True,
            defaults={"summary": "", "score": 0},
        )
        .stage(
            "answer",
            signature="question, summaries: list[str], scores: list[float], x: float -> answer",
            inputs={
                "question": "$input.question",
                "summaries": "$stage.summarize.summary",
                "scores": "$stage.summarize.score",
                "x": "$input.n",
            },
        )
        .output(answer="$stage.answer.answer", found="$stage.retrieve.found")
    )


def test_a_good_pipeline_has_no_problems() -> None:
    assert validate(good(), PROGRAMS) == []
    check(good(), PROGRAMS)


def test_a_cycle_is_named_once_with_the_stage_and_path_that_starts_it() -> None:
    pipeline = (
        Pipeline("p", inputs="q")
        .stage("a", signature="q -> x", inputs={"q": "$stage.c.z"})
        .stage("b", signature="x -> y", inputs={"x": "$stage.a.x"})
        .stage("c", signature="y -> z", inputs={"y": "$stage.b.y"})
        .stage("after", signature="z -> w", inputs={"z": "$stage.c.z"})
        .output(w="$stage.after.w")
    )
    assert paths(pipeline) == {
        "stages.a.inputs.q": "cycle: a reads c, c reads b, b reads a "
        "(a stage can only read upstream stages)"
    }


def test_a_cycle_through_map_and_when_counts_too() -> None:
    pipeline = (
        Pipeline("p", inputs="q")
        .stage(
            "a",
            signature="q -> x: list[str]",
            inputs={"q": "$input.q"},
            when={"ref": "$stage.b.y", "equals": "go"},
        )
        .stage("b", signature="x -> y", inputs={"x": "$item"}, map_over="$stage.a.x")
        .output(y="$stage.b.y")
    )
    problems = paths(pipeline)
    assert problems["stages.a.when.ref"].startswith("cycle: a reads b, b reads a")
    # b is a map stage: a reads its y as list[str], not str
    assert problems["stages.a.when.values[0]"] == '"go": expected list[str], got str'


def test_a_stage_reading_itself_is_refused() -> None:
    pipeline = (
        Pipeline("p", inputs="q")
        .stage("a", signature="q -> x", inputs={"q": "$stage.a.x"})
        .output(x="$stage.a.x")
    )
    assert paths(pipeline) == {
        "stages.a.inputs.q": "$stage.a.x: a stage cannot read its own outputs"
    }


def test_unknown_references_are_named() -> None:
    pipeline = (
        Pipeline("p", inputs="q")
        .stage(
            "a",
            signature="q, r, s, t -> x",
            inputs={
                "q": "$input.nope",
                "r": "$stage.ghost.x",
                "s": "$stage.b.nope",
                "t": "input.q",
            },
        )
        .stage("b", program="search", inputs={"query": "$input.q"})
        .output(x="$stage.a.x", y="$item", z="$stage.a.missing")
    )
    problems = paths(pipeline)
    assert problems == {
        "stages.a.inputs.q": "$input.nope: the run has no input 'nope' (inputs: q)",
        "stages.a.inputs.r": "$stage.ghost.x: no stage 'ghost' (stages: a, b)",
        "stages.a.inputs.s": "$stage.b.nope: b has no output 'nope' (outputs: passages, found)",
        "stages.a.inputs.t": "'input.q' is not a reference: use $input.<field>, "
        "$stage.<name>.<field>, $item or $item.<field>",
        "outputs.y": "$item: $item is only available in a map stage",
        "outputs.z": "$stage.a.missing: a has no output 'missing' (outputs: x)",
    }


def test_type_mismatches_are_named() -> None:
    pipeline = (
        Pipeline("p", inputs="q, n: int, f: float, items: list[str]")
        .stage(
            "a",
            signature="passages: list[str], k: int, ok: float -> x",
            inputs={"passages": "$input.q", "k": "$input.f", "ok": "$input.n"},
        )
        .stage("b", signature="t -> s", inputs={"t": "$item"}, map_over="$input.n")
        .stage("c", signature="t -> s", inputs={"t": "$item"}, map_over="$input.items")
        .stage("d", signature="s -> done", inputs={"s": "$stage.c.s"})
        .output(x="$stage.a.x")
    )
    assert paths(pipeline) == {
        "stages.a.inputs.passages": "type mismatch: $input.q is str, passages takes list[str]",
        "stages.a.inputs.k": "type mismatch: $input.f is float, k takes int",
        "stages.b.map.over": "$input.n is int: a map needs a list",
        "stages.d.inputs.s": "type mismatch: $stage.c.s is list[str], s takes str",
    }


def test_item_fields_need_object_items() -> None:
    pipeline = (
        Pipeline("p", inputs="qs: list[str]")
        .stage("m", signature="q -> meta: dict", inputs={"q": "$item"}, map_over="$input.qs")
        .stage("objects", signature="title", inputs={}, map_over="$stage.m.meta")
        .stage("strings", signature="t -> u", inputs={"t": "$item.title"}, map_over="$input.qs")
        .output(u="$stage.strings.u")
    )
    problems = paths(pipeline)
    assert (
        problems["stages.objects.signature"]
        == "expected exactly one '->' between inputs and outputs"
    )
    assert problems["stages.strings.inputs.t"] == (
        "$item.title: the items of $input.qs are str, not objects"
    )
    fixed = pipeline.stage(
        "titles", signature="title -> t", inputs={"title": "$item.title"}, map_over="$stage.m.meta"
    )
    assert "stages.titles.inputs.title" not in paths(fixed)


def test_stage_inputs_must_cover_the_program_exactly() -> None:
    pipeline = (
        Pipeline("p", inputs="q")
        .stage("a", program="search", inputs={"question": "$input.q"})
        .output(found="$stage.a.found")
    )
    assert paths(pipeline) == {
        "stages.a.inputs.question": "not an input of program search (its inputs: query)",
        "stages.a.inputs.query": "missing: program search needs query (str)",
    }


def test_a_stage_is_a_registered_program_or_an_inline_signature() -> None:
    pipeline = (
        Pipeline("p", inputs="q")
        .stage("both", program="search", signature="q -> a", inputs={"q": "$input.q"})
        .stage("neither", inputs={"q": "$input.q"})
        .stage("ghost", program="nope", inputs={"q": "$input.q"})
        .stage("moduled", program="search", module="ReAct", inputs={"query": "$input.q"})
        .stage(
            "bad", signature="q -> a: tuple", module="Magic", version=2, inputs={"q": "$input.q"}
        )
        .output(a="$stage.both.a")
    )
    problems = paths(pipeline)
    assert problems == {
        "stages.both": "give exactly one of program (registered) or signature (inline)",
        "stages.neither": "give exactly one of program (registered) or signature (inline)",
        "stages.ghost.program": "no program 'nope' is registered",
        "stages.moduled.module": "only for an inline signature (a program has its own)",
        "stages.bad.version": "a version pins a registered program: only with program",
        "stages.bad.module": "unknown module type 'Magic' (Predict, ChainOfThought, ReAct, "
        "BestOfN, Refine)",
        "stages.bad.signature": "unsupported type 'tuple' "
        "(use str, int, float, bool, list[T], dict, History)",
    }


def test_a_pinned_version_is_resolved_as_pinned() -> None:
    asked: list[tuple[str, int | None]] = []

    def resolve(program_id: str, version: int | None) -> str | None:
        asked.append((program_id, version))
        return {None: "query -> passages: list[str]", 2: "query -> hits"}.get(version)

    base = Pipeline("p", inputs="q").output(p="$stage.s.passages")
    pinned = base.stage("s", program="search", version=2, inputs={"query": "$input.q"})
    assert paths(pinned, resolve) == {
        "outputs.p": "$stage.s.passages: s has no output 'passages' (outputs: hits)"
    }
    gone = base.stage("s", program="search", version=7, inputs={"query": "$input.q"})
    assert paths(gone, resolve) == {
        "stages.s.program": "no program 'search' version 7 is registered"
    }
    assert asked == [("search", 2), ("search", 7)]


def test_when_compares_an_upstream_value_with_json_values_of_its_type() -> None:
    pipeline = (
        Pipeline("p", inputs="q, items: list[str]")
        .stage("c", program="classify", inputs={"question": "$input.q"})
        .stage(
            "a",
            signature="q -> x",
            inputs={"q": "$input.q"},
            when=Condition("$stage.c.score", ("0.5", "high", '"high"')),
        )
        .stage(
            "m",
            signature="q -> x",
            inputs={"q": "$item"},
            map_over="$input.items",
            when={"ref": "$item", "equals": "x"},
        )
        .stage(
            "e", signature="q -> x", inputs={"q": "$input.q"}, when=Condition("$stage.c.label", ())
        )
        .output(x="$stage.a.x")
    )
    problems = paths(pipeline)
    assert problems.pop("stages.a.when.values[1]").startswith("high: invalid JSON")
    assert problems == {
        "stages.a.when.values[2]": '"high": expected float, got str',
        "stages.m.when.ref": "when is decided once per stage: $item is not available",
        "stages.e.when.values": "at least one value to compare with",
    }


def test_defaults_are_typed_outputs_of_an_optional_stage() -> None:
    pipeline = (
        Pipeline("p", inputs="q, qs: list[str]")
        .stage("a", program="classify", inputs={"question": "$input.q"}, defaults={"label": "x"})
        .stage(
            "b",
            program="classify",
            inputs={"question": "$input.q"},
            optional=True,
            defaults={"score": "high", "nope": 1},
        )
        .stage(
            "m",
            signature="q -> n: int",
            inputs={"q": "$item"},
            map_over="$input.qs",
            optional=True,
            defaults={"n": [0]},
        )
        .output(label="$stage.a.label")
    )
    assert paths(pipeline) == {
        "stages.a.defaults": "defaults apply to an optional stage (optional: true)",
        "stages.b.defaults.score": '"high": expected float, got str',
        "stages.b.defaults.nope": "not an output of program classify (its outputs: label, score)",
        # a map stage's defaults stand in for one item's outputs
        "stages.m.defaults.n": "[0]: expected int, got list",
    }


def test_map_concurrency_and_pools_are_checked() -> None:
    pipeline = (
        Pipeline("p", inputs="qs: list[str]")
        .stage("m", signature="q -> a", inputs={"q": "$item"}, map_over="$input.qs", concurrency=0)
        .stage("s", signature="q -> a", inputs={"q": "$input.qs"}, concurrency=8, pool="tpu")
        .output(a="$stage.m.a")
    )
    assert paths(pipeline) == {
        "stages.m.map.concurrency": "must be >= 1, got 0",
        "stages.s.map.concurrency": "set without map.over (not a map stage)",
        "stages.s.inputs.q": "type mismatch: $input.qs is list[str], q takes str",
        "stages.s.pool": "unknown pool 'tpu' (known: general, optimizer, gpu)",
    }


def test_names_inputs_and_outputs_of_the_pipeline_are_checked() -> None:
    pipeline = Pipeline("bad id!", inputs="q: tuple")
    assert paths(pipeline) == {
        "pipeline": "'bad id!' is not a pipeline id (letters, digits, _ . -)",
        "inputs": "unsupported type 'tuple' (use str, int, float, bool, list[T], dict, History)",
        "outputs": "a pipeline needs at least one output",
    }
    twice = (
        Pipeline("p", inputs="q")
        .stage("a", signature="q -> x", inputs={"q": "$input.q"})
        .stage("a", signature="q -> y", inputs={"q": "$input.q"})
        .stage("b c", signature="q -> z", inputs={"q": "$input.q"})
        .output(**{"x": "$stage.a.x", "_x": "$stage.a.x"})
    )
    assert paths(twice) == {
        "stages.a": "stage name 'a' is used twice",
        "stages.b c": "a stage name is letters, digits, _ and - (not leading -)",
        "outputs._x": "'_x' is not a field name",
    }
    assert paths(Pipeline("p", inputs="q").output(q="$input.q")) == {
        "stages": "a pipeline needs at least one stage"
    }


def test_every_problem_is_returned_and_check_raises_them_in_one_line() -> None:
    pipeline = (
        Pipeline("p", inputs="q")
        .stage("a", signature="q -> x", inputs={"q": "$stage.b.y"})
        .stage("b", signature="x -> y: list[str]", inputs={"x": "$stage.a.x"})
        .stage("c", program="count", inputs={"n": "$input.q"})
        .output(x="$stage.a.x", t="$stage.c.total")
    )
    found = validate(pipeline, PROGRAMS)
    assert [(p.stage, p.path) for p in found] == [
        ("a", "stages.a.inputs.q"),
        ("c", "stages.c.inputs.n"),
        ("a", "stages.a.inputs.q"),
    ]
    with pytest.raises(InvalidPipeline) as refused:
        check(pipeline, PROGRAMS)
    line = str(refused.value)
    assert line.startswith("pipeline p is invalid (3 problems): stages.a.inputs.q: type mismatch")
    assert "stages.a.inputs.q: cycle: a reads b, b reads a" in line
    assert "\n" not in line


def test_a_record_from_the_topic_is_checked_as_it_is() -> None:
    stage = Stage(
        "a",
        signature="q -> x",
        inputs={"q": "$input.q"},
        when=Condition("$input.q", ("not json",)),
        optional=True,
        defaults={"x": "NaN"},
    )
    pipeline = Pipeline.from_record(
        Pipeline("p", inputs="q", stages=(stage,), outputs={"x": "$stage.a.x"}).to_record(version=1)
    )
    problems = paths(pipeline)
    assert problems["stages.a.when.values[0]"].startswith("not json: invalid JSON")
    assert problems["stages.a.defaults.x"].startswith("NaN: invalid JSON: NaN is not allowed")


def test_assignable() -> None:
    assert assignable(int, float)
    assert not assignable(float, int)
    assert assignable(list[int], list[float])
    assert not assignable(str, list[str])
    assert not assignable(list[str], str)
    assert assignable(dict[str, Any], dict[str, str])
    assert not assignable(dict[str, str], dict[str, int])
    assert assignable(Any, list[str])


def test_an_inline_program_is_checked_as_the_worker_would_build_it() -> None:
    pipeline = (
        Pipeline("p", inputs="q")
        .stage("react", signature="q -> a", module="ReAct", inputs={"q": "$input.q"})
        .stage("cot", signature="q -> reasoning", module="ChainOfThought", inputs={"q": "$input.q"})
        .stage("plain", signature="q -> reasoning", inputs={"q": "$input.q"})
        .output(a="$stage.plain.reasoning")
    )
    assert paths(pipeline) == {
        "stages.react.module": "ReAct needs tools: register it as a program with its tools",
        "stages.cot.signature": "field 'reasoning' is reserved by ChainOfThought",
    }


def test_the_reserved_fields_are_the_runtimes() -> None:
    from dspex.agents.runtime import programs
    from dspex.streams.pipelines.validate import MODULE_RESERVED

    assert programs._RESERVED == MODULE_RESERVED


def test_a_history_input_is_left_to_the_session_and_may_not_be_mapped() -> None:
    programs = {"chat": "question, history: History -> answer"}
    chat = (
        Pipeline("chat", inputs="question")
        .stage("reply", program="chat", inputs={"question": "$input.question"})
        .output(answer="$stage.reply.answer")
    )
    assert validate(chat, programs) == []
    mapped = (
        Pipeline("chat", inputs="question")
        .stage(
            "reply",
            program="chat",
            inputs={"question": "$input.question", "history": "$input.question"},
        )
        .output(answer="$stage.reply.answer")
    )
    assert (
        "filled in from the run's session" in paths(mapped, programs)["stages.reply.inputs.history"]
    )
