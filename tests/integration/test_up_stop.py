"""``dspex up`` stops within its drain timeout even when the broker is gone.

Its own single-node broker (the session's is shared): ``dspex up --no-demo`` runs
the router, learner, metrics agent and one general-pool worker against it; once
they serve, the broker is stopped, then ``dspex up`` gets SIGTERM. Every process
it started must be gone when it exits; one that did not drain within
``reliability.drain_timeout_s`` is killed, named, and makes ``dspex up`` exit 1.
Printed (run with ``-s``): seconds from the SIGTERM to ``dspex up``'s exit, its
code, and what it had to kill.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import KafkaException

from dspex.streams import kafka
from dspex.streams.ops import _kraft
from dspex.streams.ops.broker import LocalBroker
from dspex.streams.settings import LocalBrokerSettings, Settings, load_settings
from tests.integration.brokers import local_broker
from tests.integration.stack import REPO

DRAIN_S = 10


def until_groups_stable(settings: Settings, groups: list[str], timeout_s: float) -> None:
    """Until every group is stable with a member that has partitions (its agent serves)."""
    admin = kafka.admin_client(settings)
    deadline = time.monotonic() + timeout_s
    waiting = set(groups)
    while waiting:
        assert time.monotonic() < deadline, f"groups not serving after {timeout_s}s: {waiting}"
        for group, future in admin.describe_consumer_groups(list(waiting)).items():
            try:
                described = future.result(timeout=10)
            except KafkaException:  # not known to the coordinator yet
                continue
            members = [m for m in described.members if m.assignment.topic_partitions]
            if described.state.name == "STABLE" and members:
                waiting.discard(group)
        time.sleep(0.5)


def test_sigterm_to_up_with_the_broker_stopped_ends_every_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "broker"
    with local_broker(data_dir) as bootstrap:
        prefix = f"u{uuid.uuid4().hex[:8]}."
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DSPEX_TOPICS__PREFIX": prefix,
            "DSPEX_POOLS__GENERAL__PROCESSES": "1",
            "DSPEX_POOLS__OPTIMIZER__PROCESSES": "0",
            "DSPEX_POOLS__GPU__PROCESSES": "0",
            "DSPEX_LM__POOL_VARIANTS": "{}",
            "DSPEX_METRICS__PROMETHEUS_PORT": "0",
            "DSPEX_RELIABILITY__DRAIN_TIMEOUT_S": str(DRAIN_S),
            "COLUMNS": "200",
        }
        log = tmp_path / "up.log"
        with log.open("wb") as out:
            up = subprocess.Popen(
                [sys.executable, "-m", "dspex.streams", "up", "--no-demo"],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            settings = load_settings(kafka={"bootstrap_servers": bootstrap})
            until_groups_stable(settings, [f"{prefix}router", f"{prefix}pool.general"], 180)
            LocalBroker(LocalBrokerSettings(data_dir=data_dir)).stop()
            time.sleep(1)  # the agents notice: connections refused
            signalled = time.monotonic()
            up.send_signal(signal.SIGTERM)
            code = up.wait(DRAIN_S + 120)
            seconds = time.monotonic() - signalled
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    text = log.read_text(errors="replace")
    started = {name: int(pid) for name, pid in re.findall(r"(\S+) started \(pid (\d+)\)", text)}
    killed = re.search(r"killed: (.*?) \(", text)
    print(
        f"\nSIGTERM to dspex up with its broker stopped: exited {code} after {seconds:.1f}s "
        f"(drain timeout {DRAIN_S}s); processes {sorted(started)}; killed "
        f"{killed.group(1) if killed else 'none'}"
    )
    assert {"router", "learner", "metrics", "general-1"} <= set(started), text[-3000:]
    assert [name for name, pid in started.items() if _kraft.pid_alive(pid)] == []
    if killed:
        assert code == 1 and f"not drained within {DRAIN_S} s" in text
    else:
        assert code == 0, text[-3000:]
