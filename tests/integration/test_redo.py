"""A redone request never contradicts its first answer (real broker, real router and worker).

A process killed after answering a request but before committing it leaves the
request to the partition's next owner. If the deadline passed meanwhile, answering
again would say ``overloaded`` after the first ``ok``. Here the "first owner" is
the test itself: it leaves requests on ``requests`` and ``pool.general`` with
passed deadlines, answers some of them ``ok`` on ``responses`` as a worker would
have, and only then starts the router and the worker. Everything they are
assigned lies below the partitions' end at assignment, so every record is a
possible redo; the answered ones must get no second answer, the others exactly
one ``overloaded``.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

from dspex.schemas import records, times
from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.ops.admin import TopicReport
from dspex.streams.reader import read_to_end
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture
    StartStack,
    echo_settings,
    start_stack,
)


@pytest.fixture
def topics_first(create_topics: Callable[[], list[TopicReport]]) -> Iterator[None]:
    create_topics()
    yield


def test_a_redo_past_its_deadline_is_not_answered_again(
    settings: Settings,
    topics_first: None,
    start_stack: StartStack,  # noqa: F811
) -> None:
    settings = echo_settings(settings)
    topics, serde = Topics(settings.topics), make_serde(settings)
    created = times.now() - timedelta(seconds=60)
    producer = kafka.producer(settings)
    answered, unanswered = [], []
    for topic in ("requests", "pool.general"):
        for n in range(6):
            request_id = str(uuid.uuid4())
            request = {
                **sample("Request"),
                "request_id": request_id,
                "session_id": None,
                "reply_topic": None,
                "created_at": created,
                "deadline_at": created + timedelta(seconds=30),
            }
            if topic == "requests":
                request["route"] = None
            name = topics.name(topic)
            producer.produce(
                name, key=request_id.encode(), value=serde.encode("Request", request, topic=name)
            )
            if n % 2 == 0:  # the first owner answered it, then died before committing
                first = records.response(
                    request_id=request_id,
                    status="ok",
                    outputs={"answer": '"42"'},
                    pool="general",
                    produced_at=created + timedelta(seconds=1),
                )
                responses = topics.name("responses")
                producer.produce(
                    responses,
                    key=request_id.encode(),
                    value=serde.encode("Response", first, topic=responses),
                )
                answered.append(request_id)
            else:
                unanswered.append(request_id)
    assert producer.flush(30) == 0

    stack = start_stack(settings, ["general"])
    stack.wait_idle(timeout_s=120)

    finals: dict[str, list[str]] = defaultdict(list)
    for key, record in read_to_end(settings, serde, topics.name("responses"), "Response"):
        if record is not None and record["final"]:
            finals[key].append(record["status"])
    print(f"\nfinal answers: {dict(finals)}")
    for request_id in answered:
        assert finals[request_id] == ["ok"], (request_id, finals[request_id])
    for request_id in unanswered:
        assert finals[request_id] == ["overloaded"], (request_id, finals[request_id])
