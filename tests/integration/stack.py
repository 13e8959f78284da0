"""The whole DSPex request path for an end-to-end test, as real processes.

:class:`Stack` starts ``python -m dspex.agents router`` and one ``python -m dspex.agents worker
--pool P`` per pool as subprocesses — exactly what ``dspex up`` supervises — with
the test's settings passed through the environment, waits until each has joined
its consumer group, and stops them with SIGTERM (SIGKILL after a timeout) however
the test ends. :meth:`Stack.wait_idle` waits until every process has committed all
it consumed, so nothing it did can be redone; what they produced is read with a
:class:`~tests.integration.tail.Tail`.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from unittest import mock

from confluent_kafka import KafkaException

from dspex.streams import kafka
from dspex.streams.settings import POOLS, Settings, load_settings
from dspex.streams.topics import RETRY_TIERS
from tests.integration.tail import lag

__all__ = ["POOLS", "REPO", "Stack", "agent_env"]
REPO = Path(__file__).resolve().parents[2]

_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:  # a backstop: the fixture's teardown normally stops them all
    for process in list(_live):
        if process.poll() is None:
            process.kill()
            process.wait(10)


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `dspex` command on the test's broker and topics (80 columns
    unless ``COLUMNS`` is given); ``extra`` adds or overrides variables."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
        "COLUMNS": "80",
        **extra,
    }


def run_dspex(
    env: dict[str, str], *args: str, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``dspex ARGS`` (as ``python -m dspex.streams``) with ``env``; output captured."""
    cmd = [sys.executable, "-m", "dspex.streams", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def agent_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``python -m dspex.agents`` build exactly ``settings``.

    The test process's own environment is inherited (it built ``settings`` too); the
    result is checked by loading settings from it, so a setting the test changed but
    this function does not carry is an error here rather than a puzzle later.
    """
    env = dict(os.environ)
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
            "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
            "DSPEX_LM__POOL_VARIANTS": json.dumps(settings.lm.pool_variants),
            "DSPEX_LM__DEFAULT_VARIANT": settings.lm.default_variant,
            "DSPEX_POOLS": settings.pools.model_dump_json(),
            "DSPEX_LEARNER": settings.learner.model_dump_json(),
            "DSPEX_LM__BACKENDS": json.dumps(
                {
                    k: v.model_dump(mode="json", exclude_none=True)
                    for k, v in settings.lm.backends.items()
                }
            ),
            "DSPEX_JOBS": settings.jobs.model_dump_json(),
            "DSPEX_MODULES": json.dumps(settings.modules),
            "DSPEX_TOOLS": json.dumps(settings.tools),
            "DSPEX_SESSIONS": settings.sessions.model_dump_json(),
            "DSPEX_TENANTS": settings.tenants.model_dump_json(),
            "DSPEX_RELIABILITY": settings.reliability.model_dump_json(),
            "DSPEX_ROUTER__MAX_REQUEST_BYTES": str(settings.router.max_request_bytes),
            "DSPEX_ROUTER__CACHE_ENABLED": json.dumps(settings.router.cache_enabled),
            "DSPEX_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.traces_file is not None:
        env["DSPEX_TRACES_FILE"] = str(settings.traces_file)
    if settings.kafka.security_protocol != "PLAINTEXT":  # a secured broker: the whole section
        secured = settings.kafka.model_dump(mode="json", exclude_none=True)
        if settings.kafka.sasl_password is not None:
            secured["sasl_password"] = settings.kafka.sasl_password.get_secret_value()
        env["DSPEX_KAFKA"] = json.dumps(secured)
    with mock.patch.dict(os.environ, env, clear=True):
        seen = load_settings().model_copy(update={"log_level": settings.log_level})
    if seen.model_dump() != settings.model_dump():
        raise AssertionError(f"agent_env does not carry every setting of {settings!r}")
    return env


class Stack:
    """The router and one worker per pool in ``pools`` (and the pipeline agent), as subprocesses."""

    def __init__(
        self, settings: Settings, pools: Sequence[str], log_dir: Path, *, pipeline: bool = False
    ) -> None:
        self.settings = settings
        self.pools = tuple(pools)
        self.pipeline = pipeline
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, list[str]] = {}
        self.exit_codes: dict[str, int] = {}
        self.killed: list[str] = []
        self.restarts: dict[str, list[int]] = {}  # name -> exit codes of processes restarted

    @property
    def groups(self) -> dict[str, str]:
        """Consumer group per process name (and the router's retrier's own group)."""
        prefix = self.settings.topics.prefix
        groups = {"router": f"{prefix}router", "retrier": f"{prefix}router-retrier"}
        groups |= {p: f"{prefix}pool.{p}" for p in self.pools}
        return groups | ({"pipeline": f"{prefix}pipeline"} if self.pipeline else {})

    def start(self, ready_timeout_s: float = 90.0) -> None:
        """Start every process, then wait until each one's consumer group is stable."""
        base = [sys.executable, "-m", "dspex.agents"]
        # static members, as under `dspex up`: a restarted process takes its partitions back
        commands = {"router": [*base, "router", "--instance-id", "1"]}
        commands |= {
            pool: [*base, "worker", "--pool", pool, "--instance-id", "1"] for pool in self.pools
        }
        if self.pipeline:
            commands["pipeline"] = [*base, "pipeline", "--instance-id", "1"]
        self.commands = commands
        for name in commands:
            self.launch(name)
        self.wait_ready(ready_timeout_s)

    def launch(self, name: str) -> subprocess.Popen[bytes]:
        """Start (or start again, as the supervisor would) one process; its log is appended to."""
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            process = subprocess.Popen(
                self.commands[name],
                env=agent_env(self.settings),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        _live.add(process)
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        """``kill -9`` one process and reap it (``launch`` starts it again)."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        _live.discard(process)

    def restart_exited(self) -> None:
        """Start again every process that exited, as ``dspex up``'s supervisor does."""
        for name, process in list(self.processes.items()):
            if process.poll() is not None:
                self.restarts.setdefault(name, []).append(process.returncode)
                _live.discard(process)
                self.launch(name)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until every process's consumer group is stable with partitions assigned.

        One short-lived admin handle per check, with a generous request timeout: a
        request that timed out while its answer was arriving aborted the test process
        inside librdkafka (``rd_kafka_enq_once_del_source_return``) on a loaded machine.
        """
        waiting = dict(self.groups)
        deadline = time.monotonic() + timeout_s
        while waiting:
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not ready after {timeout_s}s: {sorted(waiting)}\n{self.log_tails()}"
                )
            admin = kafka.admin_client(self.settings)
            futures = admin.describe_consumer_groups(list(waiting.values()), request_timeout=30)
            for name, group in list(waiting.items()):
                if _stable_and_assigned(futures[group]):
                    del waiting[name]
            time.sleep(0.3)

    @property
    def inputs(self) -> dict[str, list[str]]:
        """The topics each process's consumer group consumes (short names)."""
        inputs = {"router": ["requests", "retry"], "retrier": [f"retry.{t}" for t in RETRY_TIERS]}
        inputs |= {p: [f"pool.{p}"] for p in self.pools}
        return inputs | ({"pipeline": ["pipeline.runs"]} if self.pipeline else {})

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until every process has committed all it consumed: nothing left that it could redo.

        The worker commits a request once the broker has all its records; the router's
        faust app commits acked records every commit interval (2.8 s by default).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            lags = {n: lag(self.settings, self.groups[n], t) for n, t in self.inputs.items()}
            if not any(lags.values()):
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle after {timeout_s}s: lag {lags}\n{self.log_tails()}")
            time.sleep(0.2)

    def check_alive(self) -> None:
        """Fail (with the logs) when a process exited while it should be serving."""
        dead = {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"agent process(es) exited: {dead}\n{self.log_tails()}")

    def stop(self, timeout_s: float = 45.0) -> None:
        """SIGTERM every process (they drain and commit), SIGKILL any that outlive the timeout."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, process in self.processes.items():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.killed.append(name)
                process.kill()
                process.wait(10)
            self.exit_codes[name] = process.returncode
            _live.discard(process)

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every process's log, for failure messages."""
        parts = []
        for name in self.processes:
            path = self.log_dir / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {name} ({path}) ---\n{tail}")
        return "\n".join(parts)

    def log_text(self, name: str) -> str:
        """One process's whole log."""
        return (self.log_dir / f"{name}.log").read_text(errors="replace")


def _stable_and_assigned(described: Future[Any]) -> bool:
    """Whether a described consumer group is stable with partitions assigned."""
    try:
        description = described.result()
    except KafkaException:  # not known to the group coordinator yet
        return False
    assigned = [m for m in description.members if m.assignment.topic_partitions]
    return bool(description.state.name == "STABLE" and assigned)
