"""The CLI against a real broker: `dspex tail` decodes records and reports bad ones."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
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
from tests.integration.stack import cli_env
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
    env = cli_env(settings)
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
    The dashboard's and the exporter's ports are held by another process, as a
    second stack on the machine would: ``up`` takes free ones and prints them.
    """
    with socket.socket() as dashboard_port, socket.socket() as exporter_port:
        for held in (dashboard_port, exporter_port):
            held.bind(("127.0.0.1", 0))
            held.listen()
        taken = [dashboard_port.getsockname()[1], exporter_port.getsockname()[1]]
        env = product_env(settings)
        env["DSPEX_DASHBOARD__PORT"] = str(taken[0])
        env["DSPEX_METRICS__PROMETHEUS_PORT"] = str(taken[1])
        cmd = [sys.executable, "-m", "dspex.streams", "up", "--once"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    dashboard = re.search(r"^dashboard  http://127\.0\.0\.1:(\d+)/$", run.stdout, re.M)
    exporter = re.search(r"^prometheus http://127\.0\.0\.1:(\d+)/metrics$", run.stdout, re.M)
    assert dashboard and exporter, run.stdout
    assert int(dashboard.group(1)) != taken[0] and int(exporter.group(1)) != taken[1]
    assert "not started" not in run.stderr
    assert "answer: " in run.stdout
    assert "status=ok pool=gpu" in run.stdout
    for name in ("router", "pipeline", "learner", "sessions", "general-1", "optimizer-1", "gpu-1"):
        assert f"{name} stopped (code 0)" in run.stderr
    print(run.stdout.split("demo", 1)[1])
    # a taken port is worth a warning (the test holds them on purpose); nothing else is
    lines = (run.stdout + run.stderr).splitlines()
    noise = [line for line in lines if "WARNING" in line and "taken" not in line]
    assert noise == [], "a healthy start and stop prints no warning"


def product_env(settings: Settings) -> dict[str, str]:
    """The environment of a user who configured nothing but the broker (no test simulation)."""
    env = cli_env(settings, DSPEX_POOLS__GENERAL__PROCESSES="1", COLUMNS="200")
    for name in ("DSPEX_LM__DEFAULT_VARIANT", "DSPEX_LM__POOL_VARIANTS"):
        env.pop(name, None)
    return env


def test_the_readme_quickstart_answers_with_the_local_model_in_every_pool(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    """`make up`, then the README's commands from another terminal: real-model answers."""
    env = product_env(settings)
    up = subprocess.Popen(
        [sys.executable, "-m", "dspex.streams", "up", "--no-demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        assert up.stdout is not None
        for line in up.stdout:
            seen.append(line)
            if "Ctrl-C (or SIGTERM)" in line:
                break
        banner = "".join(seen)
        for pool in ("general", "optimizer", "gpu"):
            assert f"pool {pool:<9} answers with local (dspex/llama-cpp)" in banner, banner
        assert "SIMULATION" not in banner

        def dspex(*args: str) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, "-m", "dspex.streams", *args]
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

        put = dspex("programs", "put", "qa", "question, context -> answer")
        assert put.returncode == 0, put.stderr
        answers = {
            "general": dspex("submit", "qa", "question=Who did it?", "context=Alice did it"),
            "gpu": dspex("submit", "question -> answer", "question=What is 2+2?", "--pool", "gpu"),
        }
        for pool, run in answers.items():
            assert run.returncode == 0, run.stderr
            assert f"pool={pool}" in run.stderr, run.stderr
            assert run.stdout.strip(), f"{pool}: empty answer"
            assert "echo" not in run.stdout.lower(), run.stdout
            print(f"{pool}: {run.stdout.strip()!r}")
        # the same question again is answered from the router's cache, which says so
        give_up, hit = time.monotonic() + 60, ""
        while time.monotonic() < give_up and "from=the router's cache" not in hit:
            again = dspex("submit", "qa", "question=Who did it?", "context=Alice did it")
            assert again.returncode == 0 and "pool=None" not in again.stderr, again.stderr
            hit = again.stderr
        assert "from=the router's cache" in hit, hit
    finally:
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=120)
    assert up.returncode == 0, "".join(seen) + rest


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
    # in a transaction, as the job runner writes them: a commit marker ends the partition
    producer = kafka.producer(settings, **{"transactional.id": f"t-{uuid.uuid4()}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for letter in letters:
        producer.produce(
            topics.name("dlq"),
            value=serde.encode("DeadLetter", letter, topic=topics.name("dlq")),
            partition=0,
        )
    producer.commit_transaction(30)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
        "COLUMNS": "250",
    }
    base = [sys.executable, "-m", "dspex.streams", "dlq"]
    started = time.monotonic()
    listing = subprocess.run([*base, "list"], env=env, capture_output=True, text=True, timeout=60)
    print(f"\ndlq list of 2 records took {time.monotonic() - started:.1f}s")
    assert listing.returncode == 0, listing.stderr
    assert request["request_id"] in listing.stdout
    assert listing.stdout.count("dlq[0]@") == 2
    assert "not read to the end" not in listing.stderr
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


def test_piped_tables_show_whole_names(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    """At 80 columns with no terminal, `topics list` printed `dspex.poo…`: nothing is cut now."""
    create_topics()
    cmd = [sys.executable, "-m", "dspex.streams", "topics", "list"]
    run = subprocess.run(cmd, env=cli_env(settings), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for name in ("pool.general", "pool.optimizer", "variables.history", "jobs.control"):
        assert f"{settings.topics.prefix}{name}" in run.stdout, run.stdout
    assert "…" not in run.stdout
