"""Pipelines as data: the builder, files (YAML/JSON) and PipelineVersion records round-trip,
and malformed files are refused with the path of every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspex.schemas.times import now
from dspex.streams.errors import InvalidRequest
from dspex.streams.pipelines import files
from dspex.streams.pipelines.problems import InvalidPipeline, Problem
from dspex.streams.pipelines.spec import Condition, Pipeline, PublishedPipeline, Stage
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings

TOPIC = "dspex.pipelines"


def support() -> Pipeline:
    """Five stages: a registered program, a map with when/optional/defaults, a pin, a join."""
    return (
        Pipeline("support", inputs="question, topics: list[str]", description="the demo")
        .stage("retrieve", program="search", inputs={"query": "$input.question"}, pool="gpu")
        .stage("classify", program="classify", version=2, inputs={"question": "$input.question"})
        .stage(
            "summarize",
            signature="topic -> summary",
            module="ChainOfThought",
            inputs={"topic": "$item"},
            map_over="$input.topics",
            concurrency=3,
            when={"ref": "$stage.classify.label", "values": ["billing", "refund"]},
            optional=True,
            defaults={"summary": ""},
        )
        .stage(
            "answer",
            signature="question, passages: list[str], summaries: list[str] -> answer",
            inputs={
                "question": "$input.question",
                "passages": "$stage.retrieve.passages",
                "summaries": "$stage.summarize.summary",
            },
        )
        .output(answer="$stage.answer.answer", label="$stage.classify.label")
    )


def test_the_builder_makes_frozen_stages_in_order() -> None:
    pipeline = support()
    assert [stage.name for stage in pipeline.stages] == [
        "retrieve",
        "classify",
        "summarize",
        "answer",
    ]
    summarize = pipeline.stage_named("summarize")
    assert summarize is not None and summarize.is_map
    assert summarize.when == Condition("$stage.classify.label", ('"billing"', '"refund"'))
    assert dict(summarize.defaults) == {"summary": '""'}
    with pytest.raises(TypeError):
        summarize.inputs["topic"] = "$input.question"  # type: ignore[index]
    with pytest.raises(AttributeError):
        pipeline.inputs = "x"  # type: ignore[misc]


def test_the_builder_returns_a_new_pipeline_each_step() -> None:
    base = Pipeline("p", inputs="q")
    one = base.stage("a", signature="q -> a", inputs={"q": "$input.q"})
    assert base.stages == ()
    assert len(one.stages) == 1
    assert one.output(a="$stage.a.a").outputs == {"a": "$stage.a.a"}
    assert one.outputs == {}


def test_the_builder_refuses_values_that_are_not_json_with_their_path() -> None:
    with pytest.raises(InvalidPipeline) as refused:
        Pipeline("p", inputs="q").stage(
            "a", signature="q -> a", optional=True, defaults={"a": {1, 2}}
        )
    assert [p.path for p in refused.value.problems] == ["stages.a.defaults.a"]
    with pytest.raises(InvalidPipeline) as refused:
        Pipeline("p").stage(
            "a", signature="q -> a", when={"ref": "$input.q", "equals": float("nan")}
        )
    assert [p.path for p in refused.value.problems] == ["stages.a.when.values[0]"]


def test_condition_equals_encodes_plain_values() -> None:
    assert Condition.equals("$stage.a.ok", True, 3, "x").values == ("true", "3", '"x"')


def test_a_record_survives_the_serde_and_comes_back_the_same_pipeline() -> None:
    serde = make_serde(Settings())
    created = now()
    record = support().to_record(version=3, created_at=created, created_by="alice")
    encoded = serde.encode("PipelineVersion", record, topic=TOPIC)
    decoded = serde.decode(encoded, topic=TOPIC).record
    assert decoded == record
    published = PublishedPipeline.from_record(decoded)
    assert published.pipeline == support()
    assert (published.version, published.created_at, published.created_by) == (3, created, "alice")
    again = published.pipeline.to_record(version=3, created_at=created, created_by="alice")
    assert again == record


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_a_file_round_trips_to_the_same_pipeline(fmt: str) -> None:
    text = files.dumps(support(), fmt=fmt)
    assert files.loads(text, fmt=fmt) == support()


def test_record_to_file_to_record_is_exact(tmp_path: Path) -> None:
    created = now()
    record = support().to_record(version=1, created_at=created)
    path = tmp_path / "support.yaml"
    path.write_text(files.dumps(Pipeline.from_record(record)))
    assert files.load(path).to_record(version=1, created_at=created) == record


def test_the_friendly_file_form_reads_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "support.yml"
    path.write_text(
        "description: retrieve, then summarize\n"
        "inputs: [question, 'topics: list[str]']\n"
        "stages:\n"
        "  retrieve:\n"
        "    program: search\n"
        "    inputs: {query: $input.question}\n"
        "  summarize:\n"
        "    signature: topic -> summary\n"
        "    map: $input.topics\n"
        "    inputs: {topic: $item}\n"
        "    when: {ref: $stage.retrieve.found, equals: true}\n"
        "    optional: true\n"
        "    defaults: {summary: ''}\n"
        "outputs: {summaries: $stage.summarize.summary}\n"
    )
    pipeline = files.load(path, pipeline_id="support")
    assert pipeline.pipeline_id == "support"
    assert pipeline.inputs == "question, topics: list[str]"
    summarize = pipeline.stages[1]
    assert summarize == Stage(
        name="summarize",
        signature="topic -> summary",
        inputs={"topic": "$item"},
        map_over="$input.topics",
        when=Condition("$stage.retrieve.found", ("true",)),
        optional=True,
        defaults={"summary": '""'},
    )


def test_unknown_keys_are_refused_with_their_path_all_at_once() -> None:
    text = (
        "pipeline: support\n"
        "inputs: topics\n"
        "stages:\n"
        "  summarize:\n"
        "    signature: topic -> summary\n"
        "    map: {over: $input.topics, concurrncy: 3}\n"
        "    input: {topic: $item}\n"
        "outputs: {s: $stage.summarize.summary}\n"
        "output: {}\n"
    )
    with pytest.raises(InvalidPipeline) as refused:
        files.loads(text)
    problems = refused.value.problems
    assert [str(p).split(" (")[0] for p in problems] == [
        "output: unknown key",
        "stages.summarize.input: unknown key",
        "stages.summarize.map.concurrncy: unknown key",
    ]
    assert [p.stage for p in problems] == [None, "summarize", "summarize"]
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith("pipeline support is invalid (3 problems): output:")


def test_wrong_shapes_are_refused_with_their_path() -> None:
    text = (
        "inputs: {question: str}\n"
        "stages:\n"
        "  a:\n"
        "    program: search\n"
        "    version: '3'\n"
        "    optional: 'yes'\n"
        "    inputs: {q: 42}\n"
        "    when: {ref: $input.q}\n"
        "  b: just text\n"
        "outputs: [a]\n"
    )
    with pytest.raises(InvalidPipeline) as refused:
        files.loads(text, pipeline_id="p")
    assert {p.path for p in refused.value.problems} == {
        "inputs",
        "stages.a.version",
        "stages.a.optional",
        "stages.a.inputs.q",
        "stages.a.when",
        "stages.b",
        "outputs",
    }


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("yaml", "inputs: q\nstages:\n  a: {signature: q -> a}\n  a: {signature: q -> b}\n"),
        ("json", '{"inputs": "q", "stages": {"a": {}, "a": {}}}'),
    ],
)
def test_duplicate_keys_are_refused_not_silently_dropped(fmt: str, text: str) -> None:
    with pytest.raises(InvalidPipeline) as refused:
        files.loads(text, fmt=fmt, pipeline_id="p", source="p.file")
    assert "duplicate key 'a'" in str(refused.value)
    assert refused.value.problems[0].path == "p.file"


def test_the_id_in_the_file_must_agree_with_the_one_given() -> None:
    text = "pipeline: support\ninputs: q\nstages: {a: {signature: q -> a}}\noutputs: {}\n"
    assert files.loads(text).pipeline_id == "support"
    with pytest.raises(InvalidPipeline) as refused:
        files.loads(text, pipeline_id="other")
    assert (
        str(refused.value.problems[0]) == "pipeline: the file names pipeline 'support', not 'other'"
    )
    with pytest.raises(InvalidPipeline, match="pipeline: missing"):
        files.loads("inputs: q\nstages: {a: {signature: q -> a}}\n")


def test_a_file_that_is_not_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("stages: [unclosed\n")
    with pytest.raises(InvalidPipeline) as refused:
        files.load(path, pipeline_id="p")
    assert refused.value.problems[0].path == str(path)
    assert "not yaml" in str(refused.value)
    with pytest.raises(InvalidPipeline, match="cannot read"):
        files.load(tmp_path / "missing.yaml", pipeline_id="p")


def test_invalid_pipeline_is_an_invalid_request_naming_the_first_path() -> None:
    error = InvalidPipeline(
        "p", [Problem("stages.a.inputs.q", "bad"), Problem("outputs.x", "worse")]
    )
    assert isinstance(error, InvalidRequest)
    assert (error.field, error.reason) == ("stages.a.inputs.q", "bad")
    assert (
        str(error) == "pipeline p is invalid (2 problems): stages.a.inputs.q: bad; outputs.x: worse"
    )


def test_the_readme_file_example_is_the_readme_builder_example_and_valid() -> None:
    from dspex.streams.pipelines.validate import validate

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Defining pipelines", 1)[1]
    text = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    from_file = files.loads(text, pipeline_id="support")
    builder = section.split("```python\n", 1)[1].split("with Client", 1)[0]
    namespace: dict[str, object] = {}
    exec(builder.replace("Client, ", ""), namespace)  # noqa: S102 - the README's own example
    assert from_file.stages == namespace["support"].stages  # type: ignore[attr-defined]
    assert from_file.outputs == namespace["support"].outputs  # type: ignore[attr-defined]
    programs = {"search": "query -> passages: list[str]", "classify": "question -> label"}
    assert validate(from_file, programs) == []


def test_a_stage_names_the_references_it_reads_and_the_stages_it_waits_for() -> None:
    summarize = support().stage_named("summarize")
    assert summarize is not None
    assert summarize.references() == (
        ("inputs.topic", "$item"),
        ("map.over", "$input.topics"),
        ("when.ref", "$stage.classify.label"),
    )
    assert summarize.upstream() == {"classify"}
    answer = support().stage_named("answer")
    assert answer is not None and answer.upstream() == {"retrieve", "summarize"}
    assert Stage("x", inputs={"q": "stage.a.b", "r": "$input.q"}).upstream() == frozenset()
