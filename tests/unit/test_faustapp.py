"""The faust app DSPex agents share: its consumer's fetch wait and its quiet Monitor."""

from __future__ import annotations

from typing import Any

from dspex.agents.plumbing.faustapp import FETCH_MAX_WAIT_MS, QuietMonitor, faust_app
from dspex.streams.settings import load_settings


async def test_the_agents_consumer_asks_again_after_fetch_max_wait_ms() -> None:
    app = faust_app(load_settings(), "dspex-test-app", "localhost:9")
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    try:
        assert consumer._fetch_max_wait_ms == FETCH_MAX_WAIT_MS == 100  # faust's own: 1500
    finally:
        await consumer._client.close()


def test_the_monitor_keeps_no_per_message_bookkeeping() -> None:
    app = faust_app(load_settings(), "dspex-test-app", "localhost:9")
    assert isinstance(app.monitor, QuietMonitor)
    monitor: Any = app.monitor  # called as faust calls it: its hooks may return state
    # faust's own Monitor would read tp.topic and stream.task_owner here, and count
    assert monitor.on_message_in(None, 0, None) is None
    assert monitor.on_stream_event_in(None, 0, None, None) is None
    assert monitor.messages_received_total == monitor.events_total == 0
