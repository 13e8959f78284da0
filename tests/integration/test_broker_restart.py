"""Chaos: restart the Kafka broker under load; producers and consumers reconnect, nothing lost.

This test runs its own single-node KRaft broker (the session's broker is shared by
every other test): router and one general worker as processes, a client sending
20 batches of 10 requests every 0.5 s; after batch 6 the broker is stopped
(SIGTERM, clean shutdown), left down for 15 s and started again on the same ports
and data directory. Counted: sent, answered, lost, duplicated finals at the client,
the longest pause in answers, and the lines each process logged while the broker
was away (repeated errors are summarised, not repeated: the log of an outage
must stay readable). Run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program, Result
from dspex.streams.errors import DSPexError
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.ops.broker import LocalBroker
from dspex.streams.settings import LocalBrokerSettings, Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.brokers import free_port
from tests.integration.stack import Stack

BATCHES, BATCH_SIZE, INTERVAL_S, RESTART_AFTER_BATCH, DOWN_S = 20, 10, 0.5, 6, 15.0
# Lines one process may log for the whole outage. Before repeats were summarised a
# 15 s outage wrote about 6,900 ERROR lines; each kind of line now appears at most
# once per 30 s window (streams/logs.py RepeatFilter), so this is a bound on kinds.
OUTAGE_LINES = 60
INLINE = Program.inline("question -> answer")


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    config = LocalBrokerSettings(
        port=free_port(), controller_port=free_port(), data_dir=tmp_path / "broker", heap="512m"
    )
    broker = LocalBroker(config)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_broker_restart_under_load_loses_nothing(
    own_broker: LocalBroker, tmp_path: Path
) -> None:
    info = own_broker.status()
    assert info is not None
    settings: Settings = load_settings(
        kafka={"bootstrap_servers": info.bootstrap_servers},
        topics={"prefix": f"r{uuid.uuid4().hex[:8]}."},
        lm={"pool_variants": {}},
    )
    ensure_topics(kafka.admin_client(settings), Topics(settings.topics).all())
    stack = Stack(settings, ["general"], tmp_path)
    stack.start()
    answered_at: list[float] = []
    restarted_at = 0.0
    logged: dict[str, int] = {}
    try:
        async with AsyncClient(settings) as client:

            async def one(question: str) -> tuple[str, Result | DSPexError]:
                try:
                    result: Result | DSPexError = await client.submit(
                        INLINE, {"question": question}, deadline_s=180, cache=False
                    )
                except DSPexError as exc:
                    result = exc
                answered_at.append(time.monotonic())
                return question, result

            tasks = []
            for batch in range(BATCHES):
                questions = [
                    f"restart {batch}.{n} {uuid.uuid4().hex[:6]}" for n in range(BATCH_SIZE)
                ]
                tasks += [asyncio.create_task(one(q)) for q in questions]
                if batch == RESTART_AFTER_BATCH:
                    before = _log_lines(stack)
                    await asyncio.to_thread(own_broker.stop)
                    await asyncio.sleep(DOWN_S)
                    await asyncio.to_thread(own_broker.start)
                    restarted_at = time.monotonic()
                    await asyncio.sleep(5)  # reconnecting is part of the outage's log
                    logged = {n: c - before[n] for n, c in _log_lines(stack).items()}
                await asyncio.sleep(INTERVAL_S)
            outcomes = await asyncio.gather(*tasks)
        stack.check_alive()
    finally:
        stack.stop()

    answered = [q for q, r in outcomes if isinstance(r, Result)]
    lost = [(q, repr(r)) for q, r in outcomes if not isinstance(r, Result)]
    wrong = [
        q for q, r in outcomes if isinstance(r, Result) and r.outputs != {"answer": f"echo: {q}"}
    ]
    after = sorted(t for t in answered_at if t > restarted_at)
    first_after = (after[0] - restarted_at) if after else float("nan")
    print(
        f"\nbroker restart under load (down {DOWN_S:.0f}s after batch {RESTART_AFTER_BATCH}): "
        f"sent {len(outcomes)}, answered {len(answered)}, lost {len(lost)} {lost[:3]}; "
        f"first answer {first_after:.1f}s after the broker was back; exit codes "
        f"{stack.exit_codes}; lines logged from the stop to 5 s after the restart {logged}"
    )
    assert lost == [] and wrong == []
    assert len(answered) == BATCHES * BATCH_SIZE
    assert all(code == 0 for code in stack.exit_codes.values()), stack.log_tails()
    noisy = {n: c for n, c in logged.items() if c > OUTAGE_LINES}
    assert not noisy, {n: stack.log_text(n).splitlines()[-OUTAGE_LINES:] for n in noisy}


def _log_lines(stack: Stack) -> dict[str, int]:
    """Lines in each process's log so far."""
    return {name: len(stack.log_text(name).splitlines()) for name in stack.processes}
