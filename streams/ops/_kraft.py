"""Pieces of the local KRaft broker that need no running broker.

Rendering ``server.properties``, choosing ports, cluster ids, process checks,
log tails and the Maven call that fetches the jars. :mod:`dspex.streams.ops.broker` puts
them together. The POM and the log4j2 configuration are embedded here so that an
installed wheel needs no data files; ``deploy/kafka/`` holds the same text for
readers, and a unit test keeps the copies equal.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from dspex.streams.errors import LocalBrokerError
from dspex.streams.ops.admin import min_insync, replication_factor

# the launcher chooses its ports with these (re-exported: tests call them here)
from dspex.streams.ops.ports import choose_port as choose_port
from dspex.streams.ops.ports import free_port as free_port
from dspex.streams.ops.ports import port_is_free as port_is_free

HOST = "127.0.0.1"
MARKER = ".dspex-complete"
TAIL_LINES = 40
MVN_TIMEOUT_S = 900.0


def server_properties(
    log_dir: Path,
    port: int,
    controller_port: int,
    *,
    node_id: int = 1,
    voters: Mapping[int, int] | None = None,
    security: Mapping[str, str] | None = None,
) -> str:
    """A combined broker+controller config on 127.0.0.1.

    Without ``voters``: a single node whose quorum is found through its own
    controller listener (formatted ``--standalone``). With ``voters`` (node id ->
    controller port, this node among them): one node of a static quorum in which
    every node is a voter; internal topics and new topics default to
    ``replication_factor(len(voters))`` replicas and ``min_insync(...)``.
    ``.properties`` values allow no trailing ``#`` comment, so comments stay on
    their own lines. ``security`` (:meth:`dspex.streams.ops.security.Material.server_properties`)
    replaces the listeners and adds TLS, SASL and the authorizer.
    """
    plaintext, controller = f"{HOST}:{port}", f"{HOST}:{controller_port}"
    replicas = replication_factor(len(voters)) if voters else 1
    min_isr = str(min_insync(replicas))
    quorum = (
        {"controller.quorum.voters": ",".join(f"{n}@{HOST}:{p}" for n, p in sorted(voters.items()))}
        if voters
        else {"controller.quorum.bootstrap.servers": controller}
    )
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        **quorum,
        "listeners": f"PLAINTEXT://{plaintext},CONTROLLER://{controller}",
        "advertised.listeners": f"PLAINTEXT://{plaintext},CONTROLLER://{controller}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        # One partition each instead of 50: a local cluster gains nothing from
        # more, and creating and loading 50 partitions adds seconds to tests.
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.num.partitions": "1",
        "offsets.topic.replication.factor": str(replicas),
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": min_isr,
        # For topics created without an explicit factor (DSPex always gives one).
        "default.replication.factor": str(replicas),
        "min.insync.replicas": min_isr,
        # The default 3 s delay slows every consumer group's first join.
        "group.initial.rebalance.delay.ms": "0",
        **(security or {}),
    }
    header = "# Written by DSPex (streams/ops/broker.py) on every start; edits are overwritten.\n"
    return header + "".join(f"{key}={value}\n" for key, value in settings.items())


def new_cluster_id() -> str:
    """A Kafka cluster id (base64url of a random UUID), as ``StorageTool random-uuid`` makes.

    Generated here to save a JVM start; Kafka also rejects ids starting with ``-``.
    """
    while True:
        raw = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not raw.startswith("-"):
            return raw


def read_properties(path: Path) -> dict[str, str]:
    """The ``key=value`` lines of a Java ``.properties`` file (no escapes, no continuations)."""
    pairs: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (reaps it if it is our own child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = 0
    if done:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_broker_process(pid: int, config: Path) -> bool:
    """True when ``pid`` runs ``kafka.Kafka`` with ``config`` (guards against pid reuse).

    Without ``/proc`` (macOS) a live pid is trusted.
    """
    if not pid_alive(pid):
        return False
    if not Path("/proc/self/cmdline").exists():
        return True
    args = _cmdline(pid)
    return args is not None and b"kafka.Kafka" in args and os.fsencode(config) in args


def _cmdline(pid: int) -> list[bytes] | None:
    # Empty for a few ms right after exec (measured), and for good in a zombie.
    for _ in range(50):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if raw:
            return raw.split(b"\0")
        time.sleep(0.01)
    return None


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path``, or a note that it does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"({path} not found)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def java_executable(java_home: str | None) -> str:
    """``$JAVA_HOME/bin/java`` when set, else ``java`` on PATH."""
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
        raise LocalBrokerError(f"JAVA_HOME={java_home} has no bin/java: fix or unset JAVA_HOME")
    found = shutil.which("java")
    if found is None:
        raise LocalBrokerError("java not found on PATH: install a JDK 17+ or set JAVA_HOME")
    return found


def run_mvn(pom: Path, out_dir: Path, kafka_version: str) -> None:
    """Copy Kafka's runtime jars into ``out_dir`` with Maven; errors carry mvn's output tail."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalBrokerError(
            f"mvn not found on PATH: Maven 3 is needed once to fetch Apache Kafka "
            f"{kafka_version} from Maven Central into {out_dir.parent}"
        )
    cmd = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
           "-DincludeScope=runtime", f"-DoutputDirectory={out_dir}",
           f"-Dkafka.version={kafka_version}"]  # fmt: skip
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd, capture_output=True, text=True, timeout=MVN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LocalBrokerError(f"`{' '.join(cmd)}` timed out after {exc.timeout:.0f} s") from exc
    if proc.returncode != 0 or not any(out_dir.glob("*.jar")):
        output = "\n".join((proc.stdout + proc.stderr).splitlines()[-TAIL_LINES:])
        raise LocalBrokerError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); is Maven Central reachable "
            f"and kafka_version={kafka_version} published?\n{output}"
        )


def format_storage(
    java: str,
    jars: Path,
    config: Path,
    cluster_id: str,
    *,
    standalone: bool,
    extra: Sequence[str] = (),
) -> None:
    """``StorageTool format``: ``--standalone`` for a single node (the controller is the only
    voter); without it for a node of a static quorum (``controller.quorum.voters``).
    ``extra``: more arguments (``--add-scram`` seeds SCRAM users); never logged, they may
    hold passwords."""
    cmd = [java, "-cp", f"{jars}/*", "kafka.tools.StorageTool", "format",
           *(["--standalone"] if standalone else []), *extra,
           "-t", cluster_id, "-c", str(config)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603
    if proc.returncode != 0:
        output = "\n".join((proc.stdout + proc.stderr).splitlines()[-TAIL_LINES:])
        shown = " ".join(cmd[: len(cmd) - len(extra) - 4] + cmd[len(cmd) - 4 :])
        raise LocalBrokerError(f"`{shown}` failed (exit {proc.returncode}):\n{output}")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing): serialises start/stop
    across processes sharing a data dir."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_tree(path: Path) -> None:
    """Remove a staging directory, ignoring one that is already gone."""
    shutil.rmtree(path, ignore_errors=True)


# Identical to deploy/kafka/pom.xml (tests/unit/test_broker.py checks).
POM_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Resolves an Apache Kafka broker's runtime classpath from Maven Central.
     Used by `dspex broker start` (streams/ops/broker.py) when no Docker engine and no
     KAFKA_BOOTSTRAP_SERVERS are available. The version is passed as -Dkafka.version.
     streams/ops/_kraft.py embeds an identical copy (so an installed wheel needs no data
     files); tests/unit/test_broker.py fails if the two differ. -->
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.dspex</groupId>
  <artifactId>dspex-local-kafka</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <properties>
    <kafka.version>4.1.2</kafka.version>
    <log4j.version>2.25.2</log4j.version>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>${kafka.version}</version>
    </dependency>
    <!-- Kafka 4.x logs through slf4j 1.7 and its tarball ships log4j2 with the slf4j 1.x
         binding; the Maven artifact declares no binding: add log4j2's. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>${log4j.version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>${log4j.version}</version>
    </dependency>
  </dependencies>
</project>
"""

# Identical to deploy/kafka/log4j2.properties (tests/unit/test_broker.py checks).
LOG4J2_PROPERTIES = """# Log4j2 config of the local KRaft broker
# that `dspex broker start` runs (streams/ops/broker.py). streams/ops/_kraft.py embeds
# an identical copy, which is what runs; tests/unit/test_broker.py keeps the two
# equal. The broker is started with -Dkafka.logs.dir=<data dir>, so INFO goes to
# <data dir>/server.log.
status = warn
name = dspex-local-kafka

appender.server.type = RollingFile
appender.server.name = server
appender.server.fileName = ${sys:kafka.logs.dir}/server.log
appender.server.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 10MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3

rootLogger.level = INFO
rootLogger.appenderRef.server.ref = server

# State-change and controller chatter drowns the lines that explain a failed start.
logger.state.name = state.change.logger
logger.state.level = WARN
logger.controller.name = kafka.controller
logger.controller.level = WARN
logger.quorum.name = org.apache.kafka.controller
logger.quorum.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
# Full config dumps (hundreds of lines per client) push the failure out of the tail.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""
