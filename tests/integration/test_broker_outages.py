"""Agents across broker outages, on a broker of the test's own (stopped and started here).

* The metrics agent (``python -m dspex.agents metrics``) keeps publishing, lag
  included, across repeated broker restarts. Its lag used to come from the Admin
  API's ``list_consumer_group_offsets``, which crashed it natively (SIGSEGV in
  librdkafka) in 4 of 8 restarts. Three restarts in the normal suite, ten in
  ``make test-soak``. After each restart the test waits for a ``pool.lag``
  snapshot of a window that closed after the broker came back: the lag path ran.
* A router and a worker started while their broker is down keep running and
  serve requests once it comes up.

Run with ``-s`` to see the figures (time from each restart to the next snapshot).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dspex.schemas import records
from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program, Result
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.ops.broker import LocalBroker
from dspex.streams.reader import read_to_end
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.stack import REPO, Stack, _live, agent_env
from tests.integration.test_broker_restart import own_broker  # noqa: F401 - fixture by name

WINDOW_S = 1.0
DOWN_S = 2.0
SNAPSHOT_TIMEOUT_S = 120.0


def _settings(broker: LocalBroker) -> Settings:
    info = broker.status()
    assert info is not None
    return load_settings(
        kafka={"bootstrap_servers": info.bootstrap_servers},
        topics={"prefix": f"o{uuid.uuid4().hex[:8]}."},
        lm={"pool_variants": {}},
    )


def _start_metrics(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = agent_env(settings)
    # no Prometheus port: other tests and engineers run metrics agents on this machine
    metrics = {"window_s": WINDOW_S, "grace_s": 0.2, "prometheus_port": 0}
    env["DSPEX_METRICS"] = json.dumps(metrics)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dspex.agents", "metrics"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _live.add(process)
    return process


def _lag_snapshot_after(settings: Settings, since_ms: int, process: subprocess.Popen[bytes]) -> int:
    """Send telemetry until a ``pool.lag`` snapshot of a window starting after ``since_ms``."""
    topics, serde = Topics(settings.topics), make_serde(settings)
    telemetry = topics.name("telemetry")
    producer = kafka.producer(settings)
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"metrics agent exited with {process.returncode}"
        now_ms = int(time.time() * 1000)
        record = records.telemetry(
            kind="execution",
            request_id=str(uuid.uuid4()),
            program_id="qa",
            pool="general",
            variant="echo",
            emitted_at=now_ms,
            latency_ms=5.0,
            success=True,
        )
        producer.produce(telemetry, serde.encode("Telemetry", record, topic=telemetry), b"qa")
        producer.flush(10)
        found = read_to_end(settings, serde, topics.name("metrics"), "MetricSnapshot")
        lags = [r for _, r in found if r is not None and r["name"] == "pool.lag"]
        starts = [s for s in (_ms(r["window_start"]) for r in lags) if s >= since_ms]
        if starts:
            return min(starts)
        time.sleep(0.5)
    raise AssertionError(f"no pool.lag snapshot after {since_ms} within {SNAPSHOT_TIMEOUT_S}s")


def _ms(value: Any) -> int:
    """Epoch milliseconds of a decoded ``timestamp-millis`` (an int or a datetime)."""
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else int(value)


@pytest.mark.parametrize(
    "restarts",
    [
        pytest.param(3, marks=pytest.mark.timeout(600)),
        pytest.param(10, marks=[pytest.mark.soak, pytest.mark.timeout(1800)]),
    ],
    ids=lambda n: f"{n}-restarts",
)
def test_the_metrics_agent_survives_repeated_broker_restarts(
    own_broker: LocalBroker,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    restarts: int,
) -> None:
    settings = _settings(own_broker)
    ensure_topics(kafka.admin_client(settings), Topics(settings.topics).all())
    log = tmp_path / "metrics.log"
    process = _start_metrics(settings, log)
    recovered: list[float] = []
    try:
        _lag_snapshot_after(settings, int(time.time() * 1000), process)
        for _ in range(restarts):
            own_broker.stop()
            time.sleep(DOWN_S)
            assert process.poll() is None, f"exited during the outage: {process.returncode}"
            own_broker.start()
            back_ms = int(time.time() * 1000)
            started = time.monotonic()
            _lag_snapshot_after(settings, back_ms, process)
            recovered.append(time.monotonic() - started)
        code = process.poll()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)
        _live.discard(process)
    print(
        f"\nmetrics agent, {restarts} broker restarts ({DOWN_S:.0f}s down each): alive after "
        f"each; seconds from each restart to a lag snapshot of a later window "
        f"{[round(s, 1) for s in recovered]}; exit code at SIGTERM {process.returncode}"
    )
    assert code is None and len(recovered) == restarts
    text = log.read_text(errors="replace")
    assert "Segmentation fault" not in text and "Assertion" not in text, text[-3000:]
    assert process.returncode == 0, text[-3000:]


async def test_a_router_and_worker_started_before_their_broker_serve_once_it_is_up(
    own_broker: LocalBroker,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    settings = _settings(own_broker)
    ensure_topics(kafka.admin_client(settings), Topics(settings.topics).all())
    own_broker.stop()
    stack = Stack(settings, ["general"], tmp_path)
    stack.commands = {
        "router": [sys.executable, "-m", "dspex.agents", "router", "--instance-id", "1"],
        "general": [
            *[sys.executable, "-m", "dspex.agents", "worker"],
            *["--pool", "general", "--instance-id", "1"],
        ],
    }
    try:
        for name in stack.commands:
            stack.launch(name)
        await asyncio.sleep(15)  # long enough to have imported DSPy and tried the broker
        stack.check_alive()  # waiting, not exited
        await asyncio.to_thread(own_broker.start)
        up = time.monotonic()
        await asyncio.to_thread(stack.wait_ready, 120)
        async with AsyncClient(settings) as client:
            result = await client.submit(
                Program.inline("question -> answer"), {"question": "hello"}, deadline_s=120
            )
        answered_s = time.monotonic() - up
        stack.check_alive()
    finally:
        stack.stop()
    print(
        f"\nrouter and worker started with the broker down: answered {answered_s:.1f}s after "
        f"the broker came up; exit codes {stack.exit_codes}"
    )
    assert isinstance(result, Result) and result.outputs == {"answer": "echo: hello"}
    assert all(code == 0 for code in stack.exit_codes.values()), stack.log_tails()
