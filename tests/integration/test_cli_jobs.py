"""`dspex optimize` refuses in the client what the job runner would refuse (real broker and CLI).

No job runner runs here: a job that passes the client's checks would only be
queued, so each refusal is also checked to have produced nothing to the jobs topic.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from dspex.schemas import records, times
from dspex.streams import kafka
from dspex.streams.ops.admin import TopicReport
from dspex.streams.reader import read_to_end
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.stack import cli_env, run_dspex


def dspex(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return run_dspex(cli_env(settings), *args)


def one_error(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 1, (run.stdout, run.stderr)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.fixture
def registered(settings: Settings, create_topics: Callable[[], list[TopicReport]]) -> str:
    create_topics()
    run = dspex(settings, "programs", "put", "toy.qa", "question -> answer")
    assert run.returncode == 0, run.stderr
    return "toy.qa"


def test_a_job_the_runner_would_refuse_is_refused_before_it_is_queued(
    settings: Settings, registered: str, tmp_path: Path
) -> None:
    dataset = tmp_path / "train.jsonl"
    dataset.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    base = ["optimize", "run", registered, "--dataset", str(dataset)]
    cases = {
        "optimizer": [*base, "--metric", "exact_match", "--optimizer", "Foo"],
        "metric": [*base, "--metric", "nope", "--optimizer", "BootstrapFewShot"],
        "val_fraction": [
            *base,
            *("--metric", "exact_match", "--optimizer", "BootstrapFewShot"),
            *("--val-fraction", "1.5"),
        ],
        "program_id": [
            *("optimize", "run", "no.such.program", "--dataset", str(dataset)),
            *("--metric", "exact_match", "--optimizer", "BootstrapFewShot"),
        ],
    }
    for field, args in cases.items():
        line = one_error(dspex(settings, *args))
        assert f"field={field}" in line, line
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"question": "q", "answer": "a"}\n' * 4 + "{oops\n", encoding="utf-8")
    args = ["optimize", "run", registered, "--dataset", str(bad_line), "--metric", "f1"]
    assert "line 5" in one_error(dspex(settings, *args, "--optimizer", "BootstrapFewShot"))
    jobs = Topics(settings.topics).name("jobs")
    assert read_to_end(settings, make_serde(settings), jobs, "OptimizationJob") == []


def test_cancel_and_follow_say_what_they_found(settings: Settings, registered: str) -> None:
    unknown = str(uuid.uuid4())
    assert f"no job {unknown}" in one_error(dspex(settings, "optimize", "cancel", unknown))
    assert f"no job {unknown}" in one_error(dspex(settings, "optimize", "follow", unknown))

    finished = str(uuid.uuid4())
    status_topic = Topics(settings.topics).name("jobs.status")
    final = records.response(
        request_id=finished,
        seq=3,
        status="ok",
        outputs={"score_before": "0.25", "score_after": "1.0", "program_version": "2"},
        pool="optimizer",
        produced_at=times.now(),
    )
    producer = kafka.producer(settings)
    serde = make_serde(settings)
    value = serde.encode("Response", final, topic=status_topic)
    producer.produce(status_topic, key=finished.encode(), value=value)
    assert producer.flush(30) == 0

    line = one_error(dspex(settings, "optimize", "cancel", finished))
    assert f"job {finished} already finished (ok)" in line
    follow = dspex(settings, "optimize", "follow", finished)
    assert follow.returncode == 0, follow.stderr
    assert f"job {finished} done" in follow.stdout
    assert "0.25 -> 1.0" in " ".join(follow.stdout.split())
    json.loads(dspex(settings, "optimize", "status", finished).stdout)
