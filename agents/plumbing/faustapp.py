"""faust plumbing shared by DSPex's stream agents (router, learner): the app and its inputs.

One place decides how a faust app connects (brokers, credentials, acks) and how a
faust message is described for dead letters, so every agent behaves alike.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
from pathlib import Path
from typing import Any, Protocol

import faust
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic
from faust.sensors import Monitor
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport

from dspex.agents.plumbing.messages import Outgoing
from dspex.streams import kafka
from dspex.streams.ops.admin import await_visible, replication_for
from dspex.streams.settings import KafkaSettings, Settings

logger = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 100
"""How long the broker may hold a faust agent's fetch when there is nothing to return.

faust hard-codes 1500 ms, and aiokafka keeps one fetch in flight per broker,
covering only the partitions with nothing buffered when it was sent. The router
consumes ``requests`` and ``retry`` together: after a burst, the fetch in flight
could cover only the idle ``retry`` partitions, and a new request then waited for
it to expire: the 0.5-0.7 s stalls at the start of the benchmark's paced phase
(router stage p99 495 ms). An idle agent now asks again ten times a second.
"""


class _ConsumerThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this when start() builds its fetcher; faust passes no setting
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(AIOKafkaConsumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(AIOKafkaTransport):
    """faust's aiokafka transport with :data:`FETCH_MAX_WAIT_MS` for the agent's consumer."""

    Consumer = _Consumer


def faust_app(settings: Settings, app_id: str, bootstrap: str) -> Any:
    """A faust app for a DSPex agent: in-memory stores, at-least-once, our security settings."""
    data_root = Path(tempfile.gettempdir()) / "dspex-faust"
    data_root.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = faust.App(
        app_id,
        broker=[f"kafka://{server.strip()}" for server in bootstrap.split(",")],
        broker_credentials=_credentials(settings.kafka),
        broker_client_id=settings.kafka.client_id,
        store="memory://",
        # faust writes <app id>-data/ into the working directory by default.
        datadir=str(data_root / "{conf.name}-data"),
        web_enabled=False,
        autodiscover=False,
        # faust itself creates only its leader-assignor topic (no data): the configured
        # factor, else 1; the changelogs (the data) are made by create_changelogs
        topic_replication_factor=settings.topics.replication_factor or 1,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=settings.kafka.linger_ms / 1000.0,
        # a killed agent's partitions move on after this, not faust's 60 s default
        broker_session_timeout=settings.reliability.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.reliability.session_timeout_s / 5),
        Monitor=QuietMonitor,
    )
    app.transport = _Transport(app.conf.broker_consumer, app)
    return app


class QuietMonitor(Monitor):
    """faust's Monitor without its per-message bookkeeping (nothing reads it: no faust web).

    faust calls these four hooks for every message; DSPex's own metrics come from
    its records (dspex.agents.metrics.metrics), so they only cost CPU on the router's hot path.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None


def create_changelogs(settings: Settings, app: Any) -> list[str]:
    """Create the app's table changelog topics (compacted) before faust starts; their names.

    faust declares them itself, but concurrently with its consumer's first
    metadata fetch: when the topic appears after that fetch, every event of the
    table's agent fails with PartitionsMismatch until a restart (seen once in
    four benchmark runs of the learner). Creating them first removes the race.
    """
    admin = kafka.admin_client(settings)
    metadata = admin.list_topics(timeout=10)
    live = metadata.topics
    replication = replication_for(len(metadata.brokers), settings.topics)
    wanted = [
        NewTopic(
            table.changelog_topic_name,
            num_partitions=table.partitions,
            replication_factor=replication.factor,
            config={"cleanup.policy": "compact", **replication.configs()},
        )
        for table in app.tables.values()
        if table.changelog_topic_name not in live
    ]
    for future in admin.create_topics(wanted).values() if wanted else ():
        try:
            future.result(timeout=30)
        except KafkaException as exc:  # another instance created it meanwhile: fine
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    await_visible(admin, {topic.topic for topic in wanted}, 30.0)
    return [topic.topic for topic in wanted]


def _credentials(settings: KafkaSettings) -> Any:
    """faust's credential object for the settings (built by :mod:`dspex.streams.kafka`)."""
    context = kafka.ssl_context(settings)
    sasl = kafka.sasl_credentials(settings)
    if sasl is not None:
        return faust.SASLCredentials(
            username=sasl.username,
            password=sasl.password,
            mechanism=sasl.mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context) if context is not None else None


SEND_TIMEOUT_S = 10.0


async def send(app: Any, out: Outgoing) -> None:
    """Produce ``out`` through the faust app's producer; a timeout is logged, not raised."""
    sending = app.producer.send(out.topic, out.key, out.value, None, None, None)
    try:
        await asyncio.wait_for(sending, SEND_TIMEOUT_S)
    except TimeoutError:
        logger.error("send timed out topic=%s", out.topic)


class ServedAgent(Protocol):
    """A DSPex stream agent: a faust ``app`` plus its own start-up and shutdown."""

    app: Any

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def serve_until_signalled(agent: ServedAgent) -> None:
    """Run ``agent`` until SIGINT/SIGTERM or until its faust app stops, then stop it."""
    asyncio.run(_serve(agent))


async def _serve(agent: ServedAgent) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await agent.start()
    try:
        crashed = asyncio.ensure_future(agent.app.wait_until_stopped())
        await asyncio.wait(
            [asyncio.ensure_future(stopping.wait()), crashed],
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        await agent.stop()
