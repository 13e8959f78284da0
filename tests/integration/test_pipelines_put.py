"""Publishing pipelines on a real broker: `dspex pipelines put|list|get` and client.pipelines.

Invalid pipelines (a cycle, an unknown reference, a type mismatch, an unknown key)
are refused by the real CLI with exit 1 and one line naming the stage and path,
and nothing reaches the topic; valid ones get versions 1, 2, 3.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints

from dspex.streams.client.client import Client
from dspex.streams.client.pipelines import read_pipelines
from dspex.streams.ops.admin import TopicReport
from dspex.streams.pipelines import files
from dspex.streams.pipelines.problems import InvalidPipeline
from dspex.streams.pipelines.spec import Pipeline
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.stack import cli_env, run_dspex

GOOD = """\
description: retrieve, classify, then answer
inputs: "question, topics: list[str]"
stages:
  retrieve:
    program: search
    inputs: {query: $input.question}
    pool: general
  classify:
    program: classify
    version: 1
    inputs: {question: $input.question}
  summarize:
    signature: "topic, passages: list[str] -> summary"
    map: {over: $input.topics, concurrency: 4}
    inputs: {topic: $item, passages: $stage.retrieve.passages}
    when: {ref: $stage.classify.label, values: [billing, refund]}
    optional: true
    defaults: {summary: ""}
  answer:
    signature: "question, summaries: list[str] -> answer"
    inputs: {question: $input.question, summaries: $stage.summarize.summary}
outputs:
  answer: $stage.answer.answer
  label: $stage.classify.label
"""

BAD = {
    "cycle": (
        GOOD.replace("{query: $input.question}", "{query: $stage.answer.answer}"),
        "stages.retrieve.inputs.query: cycle: retrieve reads answer, answer reads summarize, "
        "summarize reads retrieve",
    ),
    "unknown reference": (
        GOOD.replace("$stage.retrieve.passages}", "$stage.retrieve.documents}"),
        "stages.summarize.inputs.passages: $stage.retrieve.documents: retrieve has no output "
        "'documents'",
    ),
    "type mismatch": (
        GOOD.replace("summaries: $stage.summarize.summary}", "summaries: $input.question}"),
        "stages.answer.inputs.summaries: type mismatch: $input.question is str, "
        "summaries takes list[str]",
    ),
    "unknown key": (
        GOOD.replace("concurrency: 4}", "concurrncy: 4}"),
        "stages.summarize.map.concurrncy: unknown key",
    ),
}


def _dspex(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    # narrower than an error: it must still be one line
    return run_dspex(cli_env(settings, COLUMNS="100"), *args)


def _triage(pipeline_id: str) -> Pipeline:
    """One registered stage (``classify``): the smallest valid pipeline."""
    return (
        Pipeline(pipeline_id, inputs="question")
        .stage("classify", program="classify", inputs={"question": "$input.question"})
        .output(label="$stage.classify.label")
    )


@pytest.fixture
def registered(settings: Settings, create_topics: Callable[[], list[TopicReport]]) -> Settings:
    create_topics()
    with Client(settings) as client:
        client.publish_program("search", "query -> passages: list[str], found: bool")
        client.publish_program("classify", "question -> label")
    return settings


def test_put_refuses_each_invalid_kind_in_one_line_naming_stage_and_path(
    registered: Settings, tmp_path: Path
) -> None:
    for kind, (text, expected) in BAD.items():
        path = tmp_path / f"{kind.replace(' ', '-')}.yaml"
        path.write_text(text)
        run = _dspex(registered, "pipelines", "put", "support", str(path))
        print(f"{kind}: {run.stderr.strip()}")
        assert run.returncode == 1, (kind, run.stdout, run.stderr)
        assert run.stdout == ""
        lines = run.stderr.splitlines()
        assert len(lines) == 1, (kind, lines)
        assert lines[0].startswith("error: pipeline support is invalid: "), lines
        assert expected in lines[0], (kind, lines[0])
    topic = Topics(registered.topics).name("pipelines")
    assert read_pipelines(registered, make_serde(registered), topic) == {}


def test_put_numbers_versions_and_list_and_get_show_them(
    registered: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "support.yaml"
    path.write_text(GOOD)
    first = _dspex(registered, "pipelines", "put", "support", str(path))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "published support v1 (4 stages)"
    second = _dspex(registered, "pipelines", "put", "support", str(path), "--description", "v2")
    assert second.stdout.strip() == "published support v2 (4 stages)", second.stderr

    listed = _dspex(registered, "pipelines", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "support" in line)
    assert row.split("│")[2].strip() == "2"

    got = _dspex(registered, "pipelines", "get", "support", "--version", "1")
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("# support version 1, created ")
    assert files.loads(got.stdout) == files.load(path, pipeline_id="support")
    latest = json.loads(_dspex(registered, "pipelines", "get", "support", "--json").stdout)
    assert (latest["version"], latest["description"]) == (2, "v2")
    assert [stage["name"] for stage in latest["stages"]] == [
        "retrieve",
        "classify",
        "summarize",
        "answer",
    ]
    missing = _dspex(registered, "pipelines", "get", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no pipeline 'nope' on the pipelines topic"


def test_client_pipelines_put_validates_then_publishes_the_next_version(
    registered: Settings,
) -> None:
    pipeline = _triage("triage")
    with Client(registered) as client:
        assert client.pipelines.put(pipeline).version == 1
        with pytest.raises(InvalidPipeline) as refused:
            client.pipelines.put(
                pipeline.stage("ghost", program="unregistered", inputs={"q": "$input.question"})
            )
        assert str(refused.value.problems[0]) == (
            "stages.ghost.program: no program 'unregistered' is registered"
        )
        published = client.pipelines.put(pipeline, description="again", created_by="alice")
        assert (published.version, published.created_by) == (2, "alice")
        assert client.pipelines.get("triage") == published
        assert client.pipelines.get("triage", version=1).pipeline == pipeline  # type: ignore[union-attr]
        assert client.pipelines.get("triage", version=9) is None
        assert [p.pipeline.pipeline_id for p in client.pipelines.list()] == ["triage"]
    loaded = yaml.safe_load(files.dumps(published.pipeline))
    assert loaded["description"] == "again"


def test_puts_racing_on_one_pipeline_publish_distinct_versions(registered: Settings) -> None:
    """Four clients put the same pipeline at once: four distinct version numbers, all on the
    topic (a put is fenced per pipeline like a program's; before, each read the latest
    and two could publish the same number, one replacing the other after compaction)."""
    pipeline = _triage("raced")
    with Client(registered) as client:
        assert client.pipelines.put(pipeline).version == 1
    start = threading.Barrier(4)

    def put(who: str) -> int:
        with Client(registered) as client:
            start.wait(30)
            return client.pipelines.put(pipeline, created_by=who).version

    with ThreadPoolExecutor(4) as pool:
        published = dict(zip("abcd", pool.map(put, "abcd"), strict=True))
    found = read_pipelines(
        registered, make_serde(registered), Topics(registered.topics).name("pipelines"),
        pipeline_id="raced",
    )["raced"]  # fmt: skip
    print(f"\nracing puts: {published}; on the topic {[(p.version, p.created_by) for p in found]}")
    assert sorted(published.values()) == [2, 3, 4, 5]
    assert sorted((p.version, p.created_by) for p in found)[1:] == sorted(
        (v, who) for who, v in published.items()
    )
