"""The Java example client (``deploy/examples/java``) against the real stack.

The example is built from the contract alone: Apache Avro's Maven plugin generates
its classes from ``schemas/*.avsc`` and it talks to Kafka with Apache Kafka's own
client. This test builds it with ``mvn -q package`` (skipped when its jar is newer
than every source and schema it is built from; Maven caches its downloads in
``~/.m2``) and prints the build time, then runs ``java -jar`` against the router and
a general-pool worker started as real processes, every pool on the echo SIMULATION
(a ``str`` output is ``"echo: "`` + the first input). It asserts on what the Java
program printed, all of it decoded by Avro's Java library: a plain answer, a
streamed answer (on a reply topic of its own) and an error Response.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from dspex import schemas
from dspex.schemas import records, times
from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program
from dspex.streams.errors import ConfigError
from dspex.streams.ops.admin import TopicReport
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.stack import REPO
from tests.integration.tail import OpenTail
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    echo_settings,
    start_stack,
)

JAVA_DIR = REPO / "deploy" / "examples" / "java"
JAR = JAVA_DIR / "target" / "dspex-java-client.jar"
BUILD_TIMEOUT_S = 900.0  # the first build downloads Avro, Kafka and Maven's plugins
RUN_TIMEOUT_S = 180.0
CreateTopics = Callable[[], list[TopicReport]]
# the first build downloads and compiles (minutes on a busy machine), and the stack test runs
# the JVM five times: allow more than the suite's 300 s per test
pytestmark = pytest.mark.timeout(1200)


def _sources() -> Iterable[Path]:
    """Everything the jar is built from: the project and the contract files."""
    yield JAVA_DIR / "pom.xml"
    yield from (p for p in (JAVA_DIR / "src").rglob("*") if p.is_file())
    yield from (REPO / "schemas").glob("*.avsc")
    yield from (REPO / "schemas" / "history").glob("Response.v*.avsc")


def _up_to_date() -> bool:
    if not JAR.exists() or not (JAR.parent / "lib").is_dir():
        return False
    built = JAR.stat().st_mtime
    return all(source.stat().st_mtime < built for source in _sources())


@pytest.fixture(scope="module")
def java_client() -> Iterator[Path]:
    """The example's jar, built with Maven unless it is newer than all its sources."""
    for tool in ("mvn", "java"):
        assert shutil.which(tool), f"{tool} is not on PATH: the Java example needs JDK 17 + Maven"
    started = time.monotonic()
    if _up_to_date():
        print(f"\njava client: up to date ({JAR.relative_to(REPO)}), no build")
    else:
        built = subprocess.run(
            ["mvn", "-q", "-B", "package"],
            cwd=JAVA_DIR,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        assert built.returncode == 0, f"mvn package failed:\n{built.stdout}\n{built.stderr}"
        print(f"\njava client: built in {time.monotonic() - started:.1f} s (mvn -q package)")
    yield JAR


def java_argv(jar: Path, settings: Settings, *args: str) -> list[str]:
    """``java -jar`` the example against the test's broker and topic prefix."""
    argv = ["java", "-jar", str(jar), "--bootstrap", str(settings.kafka.bootstrap_servers)]
    return [*argv, "--prefix", settings.topics.prefix, *args]


def run_java(jar: Path, settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the example to its end; its output as text."""
    argv = java_argv(jar, settings, *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def _lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return done.stdout.splitlines()


def _chunks(lines: list[str]) -> list[tuple[int, str, bool, str]]:
    """``chunk <seq> <status>[ final] <json delta>`` lines as (seq, status, final, delta)."""
    parsed = []
    for line in lines:
        if line.startswith("chunk "):
            _, seq, status, rest = line.split(" ", 3)
            final = rest.startswith("final ")
            parsed.append((int(seq), status, final, json.loads(rest.removeprefix("final "))))
    return parsed


def _create_topic(admin: AdminClient, name: str) -> None:
    for future in admin.create_topics([NewTopic(name, 2, 1)], operation_timeout=30).values():
        future.result()


def test_java_fingerprints_are_the_contracts(java_client: Path, settings: Settings) -> None:
    """Java's SchemaNormalization fingerprint equals the one DSPex frames records with."""
    done = run_java(java_client, settings, "fingerprints")
    assert done.returncode == 0, done.stderr
    expected = [
        f"io.dspex.{name} 0x{schemas.current(name).fingerprint:016x}"
        for name in ("Request", "Response")
    ]
    assert _lines(done) == expected


def test_java_client_plain_streamed_and_error_answers(
    java_client: Path,
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    admin: AdminClient,
    tails: OpenTail,
) -> None:
    settings = echo_settings(settings)
    start_stack(settings, ["general"])
    requests = tails(["requests"], settings=settings)
    question = f"What is Kafka {uuid.uuid4().hex[:6]}?"

    plain = run_java(java_client, settings, "submit", "question -> answer", f"question={question}")
    print("java submit:", plain.stdout, plain.stderr, sep="\n")
    assert plain.returncode == 0, plain.stderr
    lines = _lines(plain)
    assert f"replies on {settings.topics.prefix}responses" in lines[0]
    assert "ok pool=general cached=false chunks=1 duplicates=0" in lines
    assert f"answer = echo: {question}" in lines
    request_id = lines[0].split()[1]

    streamed_question = f"Why Avro {uuid.uuid4().hex[:6]}?"  # not the cached one
    replies = f"{settings.topics.prefix}java.replies"
    _create_topic(admin, replies)
    streamed = run_java(
        java_client,
        settings,
        "--reply-topic",
        replies,
        "stream",
        "question -> answer",
        f"question={streamed_question}",
    )
    print("java stream:", streamed.stdout, streamed.stderr, sep="\n")
    assert streamed.returncode == 0, streamed.stderr
    lines = _lines(streamed)
    assert f"replies on {replies}" in lines[0]
    chunks = _chunks(lines)
    assert [seq for seq, *_ in chunks] == list(range(len(chunks)))
    assert len(chunks) >= 3  # token chunks before the final one
    assert [final for _, _, final, _ in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {status for _, status, final, _ in chunks if not final} == {"progress"}
    assert "".join(delta for *_, delta in chunks) == f"echo: {streamed_question}"
    assert f"text = echo: {streamed_question}" in lines
    assert f"answer = echo: {streamed_question}" in lines

    bad = run_java(java_client, settings, "submit", "question -> -> answer", "question=x")
    print("java error:", bad.stdout, bad.stderr, sep="\n")
    assert bad.returncode == 1, bad.stderr
    error = _lines(bad)[-1]
    assert error.startswith("error InvalidRequest stage=validate field=signature retryable=false:")

    # the README's final statuses for a passed deadline, with a grace long enough to hear them
    late = ["--grace-s", "120", "submit", "question -> answer", "question=late"]
    past = run_java(java_client, settings, "--deadline-s", "-1", *late)
    assert past.returncode == 1, past.stderr
    assert _lines(past)[-1].startswith(
        "timeout DeadlineExceeded stage=route field=deadline_at retryable=false:"
    )
    waited = run_java(java_client, settings, "--deadline-s", "0.001", *late)
    assert waited.returncode == 1, waited.stderr
    assert re.match(
        r"overloaded Overloaded stage=(route|queue) field=deadline_at retryable=false: "
        r"deadline_at: waited",
        _lines(waited)[-1],
    ), waited.stdout

    # rules 2 and 3, as the broker holds them: key = request_id, the three headers
    requests.wait(lambda t: len(t.of("requests")) >= 3 or None, 60, "3 Java requests")
    first = requests.messages("requests")[0]
    assert first.key() == request_id.encode()
    headers = dict(first.headers() or [])
    assert headers == {
        "dspex-request-id": request_id.encode(),
        "content-type": b"application/vnd.dspex.request+avro",
    }
    assert dict(requests.messages("requests")[1].headers() or [])["dspex-reply-topic"] == (
        replies.encode()
    )


async def test_both_clients_refuse_a_reply_topic_that_does_not_exist(
    java_client: Path, settings: Settings, create_topics: CreateTopics, tails: OpenTail
) -> None:
    """Checked before producing: the router would answer on the shared topic instead."""
    create_topics()
    requests = tails(["requests"])
    missing = f"{settings.topics.prefix}no.such.replies"
    done = run_java(java_client, settings, "--reply-topic", missing, "submit", "q -> a", "q=x")
    assert done.returncode == 2
    assert f"error: reply topic {missing} does not exist: create it first" in done.stderr
    with pytest.raises(ConfigError, match=f"topic {missing} does not exist: create it first"):
        async with AsyncClient(settings, reply_topic=missing) as client:
            await client.submit(Program.inline("q -> a"), {"q": "x"})
    await requests.caught_up()
    assert requests.of("requests") == []


def test_java_client_gives_up_at_the_deadline_plus_its_grace(
    java_client: Path, settings: Settings, create_topics: CreateTopics
) -> None:
    """Rule 6 with nothing to answer (no router runs): exit 3 once deadline + grace pass."""
    create_topics()
    started = time.monotonic()
    done = run_java(
        java_client,
        settings,
        *("--deadline-s", "1", "--grace-s", "0.5", "submit", "q -> a", "q=x"),
    )
    print(f"java client gave up after {time.monotonic() - started:.1f} s (deadline 1 s + 0.5 s)")
    assert done.returncode == 3, done.stderr
    last = _lines(done)[-1]
    assert re.match(r"timeout: request [0-9a-f-]{36}: no final chunk by its deadline ", last)
    assert last.endswith("(+0.5s grace); 0 chunk(s) received")


def test_java_client_orders_and_deduplicates_chunks(
    java_client: Path, settings: Settings, create_topics: CreateTopics, tails: OpenTail
) -> None:
    """Rule 5 against adversarial delivery, answered by this test (no router runs).

    The chunks of the Java client's request arrive out of order, twice, and beside
    another request's chunk: it must print seq 0..3 once each, in order, and count
    the two duplicates it dropped (both arrive before the final chunk can be delivered).
    """
    create_topics()
    requests = tails(["requests"])
    argv = java_argv(java_client, settings, "--deadline-s", "120", "stream", "q -> answer", "q=x")
    java = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sent = requests.wait(lambda t: t.of("requests"), RUN_TIMEOUT_S, "the Java request")
        _answer_out_of_order(settings, sent[0]["request_id"])
        out, err = java.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if java.poll() is None:
            java.kill()
            java.wait(10)
    print("java stream (out of order, duplicated):", out, err, sep="\n")
    assert java.returncode == 0, err
    assert _chunks(out.splitlines()) == [
        (0, "progress", False, "a"),
        (1, "progress", False, "b"),
        (2, "progress", False, "c"),
        (3, "ok", True, ""),
    ]
    assert "ok pool=general cached=false chunks=4 duplicates=2" in out.splitlines()
    assert "text = abc" in out.splitlines()
    assert "answer = abc" in out.splitlines()


def _answer_out_of_order(settings: Settings, request_id: str) -> None:
    """seq 1, 0, 0 again, another request's chunk, 1 again, the final 3, then 2."""
    topic = Topics(settings.topics).name("responses")
    serde = make_serde(settings)
    producer = kafka.producer(settings)

    def chunk(rid: str, seq: int, delta: str = "", final: bool = False) -> None:
        record = records.response(
            request_id=rid,
            seq=seq,
            final=final,
            status="ok" if final else "progress",
            delta=delta,
            outputs={"answer": json.dumps("abc")} if final else None,
            pool="general",
            produced_at=times.now(),
        )
        producer.produce(topic, serde.encode("Response", record, topic=topic), rid.encode())

    chunk(request_id, 1, "b")
    chunk(request_id, 0, "a")
    chunk(request_id, 0, "a")
    chunk(str(uuid.uuid4()), 0, "not mine")
    chunk(request_id, 1, "b")
    chunk(request_id, 3, final=True)
    chunk(request_id, 2, "c")
    assert producer.flush(30) == 0
