"""The system under test: a broker, uuid-prefixed topics, router and worker processes.

Agents run as real processes (``python -m dspex.agents router`` / ``worker --pool general``)
in a scratch directory (faust writes its data dir into the working directory), so
each one's CPU can be read from ``/proc`` and each can be profiled with pyinstrument.
Everything started here is stopped here, also on errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

from dspex.streams import kafka
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.ops.broker import LocalBroker
from dspex.streams.settings import LocalBrokerSettings, Settings, load_settings
from dspex.streams.topics import Topics
from tests.bench.cpu import listening_pid
from tests.integration.brokers import free_port

STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Broker:
    """Where the broker is, what it is, and its JVM's pid when it runs on this machine."""

    bootstrap: str
    source: str
    pid: int | None
    kafka_version: str


@contextlib.contextmanager
def bench_broker(data_dir: Path, bootstrap: str | None = None) -> Iterator[Broker]:
    """``bootstrap`` (else ``KAFKA_BOOTSTRAP_SERVERS``) if given, else a fresh local broker."""
    version = LocalBrokerSettings().kafka_version
    existing = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if existing:
        yield Broker(existing, "existing cluster", _local_pid(existing), f"{version}?")
        return
    settings = LocalBrokerSettings(
        port=free_port(), controller_port=free_port(), data_dir=data_dir, heap="768m"
    )
    broker = LocalBroker(settings)
    info = broker.start()
    try:
        yield Broker(info.bootstrap_servers, "local KRaft broker", info.pid, info.kafka_version)
    finally:
        broker.stop()


def _local_pid(bootstrap: str) -> int | None:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if host not in ("127.0.0.1", "localhost", "") or not port.isdigit():
        return None
    return listening_pid(int(port))


def bench_settings(
    bootstrap: str, prefix: str | None = None, partitions: dict[str, int] | None = None
) -> Settings:
    """Settings for this run's uuid topic prefix on ``bootstrap``.

    The benchmarks measure DSPex, not a model: the general and optimizer pools answer
    with the echo SIMULATION (the gpu pool keeps the local model), as in the tests.
    """
    prefix = prefix or f"bench{uuid.uuid4().hex[:8]}."
    return load_settings(
        kafka={"bootstrap_servers": bootstrap},
        topics={"prefix": prefix, "partitions": partitions or {}},
        lm={"default_variant": "echo", "pool_variants": {"gpu": "local"}},
    )


@contextlib.contextmanager
def catalog_topics(settings: Settings) -> Iterator[AdminClient]:
    """Create the catalog's topics under the settings' prefix; delete every prefixed topic after."""
    admin = kafka.admin_client(settings)
    ensure_topics(admin, Topics(settings.topics).all())
    try:
        yield admin
    finally:
        delete_prefixed(admin, settings.topics.prefix)


def delete_prefixed(admin: AdminClient, prefix: str) -> None:
    """Delete every topic whose name starts with ``prefix`` (faust's changelogs too)."""
    doomed = [name for name in admin.list_topics(timeout=10).topics if name.startswith(prefix)]
    if not doomed:
        return
    for future in admin.delete_topics(doomed, operation_timeout=30).values():
        with contextlib.suppress(Exception):
            future.result()


class AgentProcess:
    """One ``python -m dspex.agents ...`` (or ``-m <module>``) process, maybe under pyinstrument."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        workdir: Path,
        profile: Path | None,
        module: str = "dspex.agents",
    ) -> None:
        self.name = name
        prefix = [sys.executable]
        if profile is not None:
            prefix += ["-m", "pyinstrument", "-r", "text", "--no-color", "-o", str(profile)]
        self.log = workdir / f"{name}.log"
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                [*prefix, "-m", module, *args],
                env=env,
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with code {code}:\n{tail}")

    def stop(self) -> int | None:
        """SIGTERM (the agents drain and exit), SIGKILL after STOP_TIMEOUT_S."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


REPO_ROOT = Path(__file__).resolve().parents[2]


def agent_env(settings: Settings, in_flight: int) -> dict[str, str]:
    """The environment an agent process needs to join this run."""
    # the repository root, so an experimental router (``-m tests.bench.ckrouter``) imports
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
        "DSPEX_POOLS__GENERAL__IN_FLIGHT": str(in_flight),
        "DSPEX_LM__DEFAULT_VARIANT": settings.lm.default_variant,
        "DSPEX_LM__POOL_VARIANTS": json.dumps(settings.lm.pool_variants),
        "DSPEX_LM__BACKENDS": json.dumps(
            {
                k: v.model_dump(mode="json", exclude_none=True)
                for k, v in settings.lm.backends.items()
            }
        ),
        "DSPEX_LOG_LEVEL": "WARNING",
    }


def wait_for_members(
    admin: AdminClient, group: str, count: int, procs: list[AgentProcess], timeout_s: float = 120
) -> None:
    """Block until ``group`` is stable with ``count`` members that all hold partitions."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_alive()
        if _stable_members(admin, group) == count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"group {group} did not reach {count} assigned members in {timeout_s}s")


def _stable_members(admin: AdminClient, group: str) -> int:
    try:
        described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    except Exception:
        return -1
    if str(described.state).rsplit(".", 1)[-1] != "STABLE":
        return -1
    members = described.members
    if any(not m.assignment or not m.assignment.topic_partitions for m in members):
        return -1
    return len(members)
