"""One local KRaft node (broker + controller), run from Apache Kafka's own jars (no Docker).

``LocalBroker(settings).start()`` fetches the jars once with Maven into
``cache_dir/kafka-<version>/``, formats KRaft storage once under ``data_dir``,
writes ``server.properties`` for free ports on 127.0.0.1 and starts
``kafka.Kafka`` detached (it outlives the CLI that started it). Alone it is a
single-node cluster; given a :class:`NodeSpec` it is one node of a static quorum
that :class:`dspex.streams.ops.cluster.LocalCluster` puts together (the entry
point the CLI uses for one node or several). Its data dir holds::

    broker.json        state file: pid, bootstrap, version, started_at
    server.properties  rewritten on every start (ports may change)
    log4j2.properties  the broker's logging config
    server.log         the broker's log (INFO; controller chatter at WARN)
    broker.out         JVM stdout/stderr (crashes before logging starts)
    kraft/             log.dirs: the formatted KRaft storage and topic data
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from dspex.streams.errors import BrokerUnavailable, LocalBrokerError
from dspex.streams.ops import _kraft
from dspex.streams.ops.security import ADMIN, MECHANISM, Material
from dspex.streams.settings import LocalBrokerSettings

logger = logging.getLogger(__name__)

STATE_FILE = "broker.json"


@dataclass(frozen=True)
class BrokerInfo:
    """A running local broker, as recorded in its state file."""

    bootstrap_servers: str
    pid: int
    kafka_version: str
    data_dir: Path
    log_file: Path
    node_id: int = 1


@dataclass(frozen=True)
class NodeSpec:
    """One node of a local multi-node cluster: fixed ports, the quorum, the shared cluster id.

    ``voters`` maps every node id to its controller port (this node's included): a
    static quorum in which every node votes.
    """

    node_id: int
    data_dir: Path
    port: int
    controller_port: int
    voters: dict[int, int]
    cluster_id: str


class LocalBroker:
    """Starts, finds and stops one KRaft node: the single-node broker, or ``node`` of a cluster."""

    def __init__(
        self,
        settings: LocalBrokerSettings,
        *,
        pom: Path | None = None,
        node: NodeSpec | None = None,
    ) -> None:
        self.settings = settings
        # None: the POM embedded in dspex.streams.ops._kraft (identical to deploy/kafka/pom.xml).
        self.pom = pom
        self.node = node
        # Absolute: the config path in the JVM's argv identifies the process later.
        self.data_dir = (node.data_dir if node else settings.data_dir).expanduser().absolute()
        cache_dir = settings.cache_dir.expanduser().absolute()
        self.jar_dir = cache_dir / f"kafka-{settings.kafka_version}"
        self.config = self.data_dir / "server.properties"
        self.log_file = self.data_dir / "server.log"
        self.out_file = self.data_dir / "broker.out"
        self.state_file = self.data_dir / STATE_FILE
        self.log_dir = self.data_dir / "kraft"
        # a secured node (dspex.streams.ops.security): its CA, key store and SCRAM users
        self.security = Material(self.data_dir) if settings.secure else None

    def ensure_jars(self) -> Path:
        """Kafka's runtime classpath in ``cache_dir/kafka-<version>/``, fetched once.

        Maven copies into a staging directory that is renamed into place with a
        marker file, so an interrupted download never looks complete.
        """
        if (self.jar_dir / _kraft.MARKER).is_file():
            return self.jar_dir
        self.jar_dir.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.jar_dir.name}-"
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.jar_dir.parent))
        try:
            self._download(staging)
        finally:
            _kraft.remove_tree(staging)
        return self.jar_dir

    def _download(self, staging: Path) -> None:
        pom = staging / "pom.xml"
        pom.write_text(self.pom.read_text() if self.pom else _kraft.POM_XML, encoding="utf-8")
        jars = staging / "jars"
        started = time.monotonic()
        logger.info("fetching Kafka jars version=%s dir=%s", self.settings.kafka_version, jars)
        _kraft.run_mvn(pom, jars, self.settings.kafka_version)
        count = len(list(jars.glob("*.jar")))
        (jars / _kraft.MARKER).write_text(f"{self.settings.kafka_version} {count} jars\n")
        if self.jar_dir.exists() and not (self.jar_dir / _kraft.MARKER).is_file():
            _kraft.remove_tree(self.jar_dir)  # left by something other than this code
        try:
            jars.rename(self.jar_dir)
        except OSError:
            if not (self.jar_dir / _kraft.MARKER).is_file():
                raise
            # Another process finished the same download first: use its copy.
        seconds = time.monotonic() - started
        logger.info("fetched Kafka jars count=%d seconds=%.1f", count, seconds)

    def start(self, *, wait: bool = True) -> BrokerInfo:
        """Start the broker, or return the one already running; waits until it answers.

        ``wait=False`` returns once the JVM is spawned: a node of a cluster cannot
        answer before a majority of the quorum runs, so the cluster starts them all
        first and then calls :meth:`wait_ready` on each.
        """
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            info = self.status() or self._launch()
        if wait:
            self.wait_ready(info, started + self.settings.start_timeout_s)
            logger.info(
                "local broker ready node=%d pid=%d bootstrap=%s seconds=%.1f",
                info.node_id, info.pid, info.bootstrap_servers, time.monotonic() - started,
            )  # fmt: skip
        return info

    def _launch(self) -> BrokerInfo:
        jars = self.ensure_jars()
        java_home = self.settings.java_home
        java = _kraft.java_executable(str(java_home) if java_home else None)
        port, controller_port = self._choose_ports()
        node_id, voters = (self.node.node_id, self.node.voters) if self.node else (1, None)
        self._check_security()
        listener, controller = f"{_kraft.HOST}:{port}", f"{_kraft.HOST}:{controller_port}"
        security, mtls = None, ""
        if self.security is not None:
            self.security.ensure()
            wanted = self.settings.mtls_port
            mtls = f"{_kraft.HOST}:{_kraft.choose_port(wanted, taken=(port, controller_port))}"
            security = self.security.server_properties(listener, controller, mtls)
        self.config.write_text(
            _kraft.server_properties(
                self.log_dir, port, controller_port, node_id=node_id, voters=voters,
                security=security,
            ),
            encoding="utf-8",
        )  # fmt: skip
        self._ensure_formatted(java, jars)
        info = self._spawn(java, jars, listener)
        if self.security is not None:
            for name, text in self.security.client_settings(listener, mtls).items():
                (self.security.dir / name).write_text(text, encoding="utf-8")
        return info

    def _check_security(self) -> None:
        """Refuse to start formatted storage with the other kind of listener than it was made for.

        A plain node's storage has no SCRAM users (nobody could log in), and a secured
        node's data must not become readable by anyone on a plaintext port.
        """
        if self.node is not None and self.security is not None:
            raise LocalBrokerError("a secured local broker is a single node: use --nodes 1")
        if not (self.log_dir / "meta.properties").is_file():
            return
        was_secure = Material(self.data_dir).exists()
        if was_secure != (self.security is not None):
            kind = "a secured" if was_secure else "a plain"
            raise LocalBrokerError(
                f"{self.data_dir} holds {kind} broker's storage: start it "
                f"{'with' if was_secure else 'without'} --secure (local_broker.secure), "
                "or choose another local_broker.data_dir"
            )

    def _choose_ports(self) -> tuple[int, int]:
        """The configured ports where free, else free ones (fine for formatted storage too).

        A cluster's node has the ports its cluster chose: the other nodes' quorum
        config names them, so a busy one is an error, not a reason to move.
        """
        if self.node is not None:
            ports = (self.node.port, self.node.controller_port)
            busy = [p for p in ports if not _kraft.port_is_free(p)]
            if busy:
                raise LocalBrokerError(
                    f"node {self.node.node_id}: port(s) {busy} on {_kraft.HOST} are taken by "
                    "another program; the other nodes expect this node there"
                )
            return ports
        wanted = (self.settings.port, self.settings.controller_port)
        port = _kraft.choose_port(wanted[0])
        controller = _kraft.choose_port(wanted[1], taken=(port,))
        if (port, controller) != wanted:
            logger.info("configured ports busy, using port=%d controller_port=%d", port, controller)
        return port, controller

    def _ensure_formatted(self, java: str, jars: Path) -> None:
        """Format KRaft storage unless ``log_dir`` already holds a formatted node.

        ``format --standalone`` records the controller endpoint in the bootstrap
        checkpoint, but a single voter becomes leader with the listener in the
        current ``server.properties`` and writes a new voter set, so the ports may
        change between starts without re-formatting.
        """
        meta = self.log_dir / "meta.properties"
        if meta.is_file():
            logger.debug("storage formatted dir=%s", self.log_dir)
            return
        if self.log_dir.is_dir() and any(self.log_dir.iterdir()):
            raise LocalBrokerError(
                f"{self.log_dir} is not empty but has no meta.properties: it is not KRaft "
                "storage this broker formatted; remove it to start from empty storage"
            )
        cluster_id = self.node.cluster_id if self.node else _kraft.new_cluster_id()
        logger.info("formatting storage dir=%s cluster_id=%s", self.log_dir, cluster_id)
        extra = self.security.scram_args() if self.security is not None else []
        _kraft.format_storage(
            java, jars, self.config, cluster_id, standalone=self.node is None, extra=extra
        )

    def _spawn(self, java: str, jars: Path, bootstrap: str) -> BrokerInfo:
        log4j2 = self.data_dir / "log4j2.properties"
        log4j2.write_text(_kraft.LOG4J2_PROPERTIES, encoding="utf-8")
        cmd = [java, f"-Xmx{self.settings.heap}", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={log4j2}", f"-Dkafka.logs.dir={self.data_dir}",
               # Log4j's own hook would stop logging before Kafka's shutdown lines.
               "-Dlog4j2.shutdownHookEnabled=false",
               "-cp", f"{jars}/*", "kafka.Kafka", str(self.config)]  # fmt: skip
        logger.debug("starting broker cmd=%s", " ".join(cmd))
        with self.out_file.open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.data_dir, start_new_session=True,
            )  # fmt: skip
        node_id = self.node.node_id if self.node else 1
        info = BrokerInfo(
            bootstrap, proc.pid, self.settings.kafka_version, self.data_dir, self.log_file, node_id
        )
        self._write_state(info)
        return info

    def wait_ready(self, info: BrokerInfo, deadline: float) -> None:
        """Poll metadata until the broker answers; fail with the log tail."""
        admin = AdminClient(probe_conf(info.bootstrap_servers, self.security))
        while True:
            if not _kraft.is_broker_process(info.pid, self.config):
                self.state_file.unlink(missing_ok=True)
                raise LocalBrokerError(self._failure(f"broker pid={info.pid} exited during start"))
            if _answers(admin, timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise BrokerUnavailable(self._failure(
                    f"broker pid={info.pid} at {info.bootstrap_servers} did not answer within "
                    f"{self.settings.start_timeout_s:.0f} s (still running: stop() it or retry)"
                ))  # fmt: skip
            time.sleep(0.2)

    def _failure(self, headline: str) -> str:
        return (
            f"{headline}; command: java -cp '{self.jar_dir}/*' kafka.Kafka {self.config}\n"
            f"--- {self.log_file} ---\n{_kraft.tail(self.log_file)}\n"
            f"--- {self.out_file} ---\n{_kraft.tail(self.out_file)}"
        )

    def status(self) -> BrokerInfo | None:
        """The running broker, else None (a state file whose process is gone is removed).

        Checks the process (pid alive and running ``kafka.Kafka`` with this data
        dir's config), not the network: a broker still starting counts as running.
        """
        info = self._read_state()
        if info is None:
            return None
        if _kraft.is_broker_process(info.pid, self.config):
            return info
        logger.debug("removing stale state file=%s pid=%d", self.state_file, info.pid)
        self.state_file.unlink(missing_ok=True)
        return None

    def stop(self, timeout_s: float = 30) -> bool:
        """SIGTERM the broker's process group, SIGKILL it after ``timeout_s``.

        Returns True when a broker was running and has been stopped.
        """
        if not self.data_dir.is_dir():
            return False
        with self._lock():
            info = self.status()
            if info is None:
                return False
            logger.info("stopping local broker pid=%d", info.pid)
            _signal_group(info.pid, signal.SIGTERM)
            if not _wait_exit(info.pid, timeout_s):
                logger.info("SIGKILL broker pid=%d after %.0f s", info.pid, timeout_s)
                _signal_group(info.pid, signal.SIGKILL)
                if not _wait_exit(info.pid, 10.0):
                    raise LocalBrokerError(f"broker pid={info.pid} survived SIGKILL")
            self.state_file.unlink(missing_ok=True)
            return True

    def _write_state(self, info: BrokerInfo) -> None:
        state = {
            **asdict(info),
            "data_dir": str(info.data_dir),
            "log_file": str(info.log_file),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.state_file)

    def _read_state(self) -> BrokerInfo | None:
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
            return BrokerInfo(
                bootstrap_servers=str(state["bootstrap_servers"]),
                pid=int(state["pid"]),
                kafka_version=str(state["kafka_version"]),
                data_dir=self.data_dir,
                log_file=self.log_file,
                node_id=int(state.get("node_id", 1)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable state file=%s error=%s", self.state_file, exc)
            self.state_file.unlink(missing_ok=True)
            return None

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return _kraft.file_lock(self.data_dir / ".broker.lock")


def probe_conf(
    bootstrap: str, security: Material | None = None
) -> dict[str, str | int | float | bool]:
    """An AdminClient config to ask a local node for metadata (as dspex-admin when secured)."""
    # log_level 0: refused connections while the broker boots are expected, not news.
    conf: dict[str, str | int | float | bool] = {
        "bootstrap.servers": bootstrap,
        "log_level": 0,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
        "socket.connection.setup.timeout.ms": 2000,
    }
    if security is not None:
        conf |= {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": MECHANISM,
            "sasl.username": ADMIN,
            "sasl.password": security.password(ADMIN),
            "ssl.ca.location": str(security.ca),
        }
    return conf


def _answers(admin: AdminClient, timeout: float) -> bool:
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return bool(metadata.brokers)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the broker's session (JVM and any children); fall back to the pid alone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError as exc:
        raise LocalBrokerError(f"not allowed to signal broker pid={pid}: {exc}") from exc


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _kraft.pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
