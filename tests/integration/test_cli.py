"""The CLI against a real broker: `dspex tail` decodes records and reports bad ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from dspex.agents.plumbing.messages import Consumed, ErrorInfo
from dspex.agents.plumbing.records import dead_letter
from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.ops.admin import TopicReport
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.tail import OpenTail


def test_tail_prints_decoded_records_and_names_undecodable_ones(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    create_topics()
    topic = Topics(settings.topics).name("dlq")
    record = sample("DeadLetter")
    producer = kafka.producer(settings)
    producer.produce(
        topic,
        key=b"good",
        value=make_serde(settings).encode("DeadLetter", record, topic=topic),
        partition=0,
    )
    producer.produce(topic, key=b"bad", value=b"not avro", partition=0)
    assert producer.flush(30) == 0
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
    }
    cmd = [sys.executable, "-m", "dspex.streams", "tail", "dlq", "--from-beginning", "--max", "2"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    good, bad = (json.loads(line) for line in run.stdout.splitlines())
    assert good["key"] == "good"
    assert good["schema"] == "DeadLetter"
    assert good["value"]["error_message"] == record["error_message"]
    assert bad["key"] == "bad"
    assert bad["offset"] == 1
    assert f"topic={topic}" in bad["error"]
    assert "bad magic" in bad["error"]


def test_tail_of_a_topic_that_does_not_exist_is_one_error_line_and_exit_1(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    create_topics()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
        "COLUMNS": "80",
    }
    cmd = [sys.executable, "-m", "dspex.streams", "tail", "nosuchtopic", "--idle", "5"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: topic nosuchtopic does not exist (see `dspex topics list`)"]


def test_up_once_runs_the_stack_and_streams_the_demo_through_the_local_model(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    """The README's main job end to end: topics, router, three pools, a streamed answer.

    ``create_topics`` is only here for its teardown: ``dspex up`` creates the topics.
    """
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
        "DSPEX_POOLS__GENERAL__PROCESSES": "1",
        "COLUMNS": "200",
    }
    cmd = [sys.executable, "-m", "dspex.streams", "up", "--once"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "answer: " in run.stdout
    assert "status=ok pool=gpu" in run.stdout
    for name in ("router", "learner", "sessions", "general-1", "optimizer-1", "gpu-1"):
        assert f"{name} stopped (code 0)" in run.stderr
    print(run.stdout.split("demo", 1)[1])


def test_dlq_list_and_replay_resubmit_the_original_bytes(
    settings: Settings, create_topics: Callable[[], list[TopicReport]], tails: OpenTail
) -> None:
    create_topics()
    topics = Topics(settings.topics)
    serde = make_serde(settings)
    request = sample("Request")
    original = serde.encode("Request", request, topic=topics.name("requests"))
    letters = [
        {
            **sample("DeadLetter"),
            "original_topic": topics.name("requests"),
            "original_key": b"k1",
            "original_value": original,
            "stage": "validate",
            "request_id": request["request_id"],
            "original_headers": [
                {"key": "dspex-request-id", "value": request["request_id"].encode()}
            ],
        },
        {**sample("DeadLetter"), "stage": "decode", "request_id": None},
    ]
    producer = kafka.producer(settings)
    for letter in letters:
        producer.produce(
            topics.name("dlq"),
            value=serde.encode("DeadLetter", letter, topic=topics.name("dlq")),
            partition=0,
        )
    assert producer.flush(30) == 0
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
        "COLUMNS": "250",
    }
    base = [sys.executable, "-m", "dspex.streams", "dlq"]
    listing = subprocess.run([*base, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert request["request_id"] in listing.stdout
    assert listing.stdout.count("dlq[0]@") == 2
    replay = subprocess.run(
        [*base, "replay", "--stage", "validate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stderr
    assert "1 record(s) replayed" in replay.stdout

    requests = tails(["requests"], from_beginning=True)
    msg = requests.wait(lambda t: next(iter(t.messages("requests")), None), 30, "the replay")
    assert msg.key() == b"k1"
    assert msg.value() == original
    headers = dict(msg.headers() or [])
    assert headers["dspex-replay-of"] == b"dlq[0]@0"
    assert headers["dspex-request-id"] == request["request_id"].encode()


def test_dlq_replay_reads_an_omitted_original_back_from_its_topic(
    settings: Settings, create_topics: Callable[[], list[TopicReport]], tails: OpenTail
) -> None:
    create_topics()
    topics = Topics(settings.topics)
    serde = make_serde(settings)
    requests = topics.name("requests")
    big = b"\x00" * 600_000  # over what a dead letter embeds
    producer = kafka.producer(settings)
    delivered: list[Any] = []
    producer.produce(requests, big, b"big", on_delivery=lambda err, msg: delivered.append(msg))
    assert producer.flush(30) == 0
    (msg,) = delivered
    original = Consumed(requests, msg.partition(), msg.offset(), key=b"big", value=big)
    failure = ErrorInfo("InvalidRequest", "too big", field="inputs.question", stage="validate")
    letter = dead_letter(original, failure, component="router", failed_at_ms=0, request_id="r-big")
    assert letter["original_value_omitted"] and letter["original_value"] is None
    dlq = topics.name("dlq")
    producer.produce(dlq, serde.encode("DeadLetter", letter, topic=dlq), partition=0)
    assert producer.flush(30) == 0
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
    }
    replay = subprocess.run(
        [sys.executable, "-m", "dspex.streams", "dlq", "replay", "--request-id", "r-big"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stderr
    assert "1 record(s) replayed" in replay.stdout
    tail = tails(["requests"], from_beginning=True)
    where = (msg.partition(), msg.offset())
    replayed = tail.wait(
        lambda t: next(
            (m for m in t.messages("requests") if (m.partition(), m.offset()) != where), None
        ),
        30,
        "the replay after the original",
    )
    assert replayed.partition() == msg.partition() and replayed.offset() > msg.offset()
    assert replayed.value() == big and replayed.key() == b"big"
