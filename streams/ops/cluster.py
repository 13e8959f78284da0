"""The local Kafka cluster: one KRaft node, or N that each run a broker and a controller.

``LocalCluster(settings).start()`` is what ``dspex broker start [--nodes N]`` and
``dspex up`` call. With one node it is exactly :class:`LocalBroker` on
``data_dir``. With N (3 is the point) it starts N JVMs, each a
:class:`LocalBroker` given a :class:`NodeSpec`: every node is both a broker and
a voter of a static controller quorum (``controller.quorum.voters``), the
combined mode Kafka supports for small clusters. Three voters keep a majority
when any one node dies; separate controllers would need three more JVMs, more
than a two-core machine should carry for a local cluster. Topics default to 3
replicas with ``min.insync.replicas=2`` there (:mod:`dspex.streams.ops.admin`).

A cluster's ``data_dir`` holds::

    cluster.json   node count, cluster id, each node's ports (a restarted node reuses its own)
    .cluster.lock  serialises start/stop across processes
    node-<n>/      node n's data dir, laid out as LocalBroker's

``start`` starts whichever nodes are not running (so it also restarts one that
died); ``status`` and ``stop`` cover every node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from dspex.streams.errors import BrokerUnavailable, LocalBrokerError
from dspex.streams.ops import _kraft
from dspex.streams.ops.broker import STATE_FILE, BrokerInfo, LocalBroker, NodeSpec, probe_conf
from dspex.streams.settings import LocalBrokerSettings

logger = logging.getLogger(__name__)

LAYOUT_FILE = "cluster.json"
QUORUM_STATE = Path("kraft") / "__cluster_metadata-0" / "quorum-state"


@dataclass(frozen=True)
class ClusterInfo:
    """The running nodes of a local cluster (one for a single broker) and where to reach them."""

    nodes: tuple[BrokerInfo, ...]
    # every node's address, running or not: a client finds whichever is up
    bootstrap_servers: str
    size: int
    data_dir: Path

    @property
    def down(self) -> tuple[int, ...]:
        """Node ids of the cluster that are not running."""
        up = {node.node_id for node in self.nodes}
        return tuple(n for n in range(1, self.size + 1) if n not in up)

    @property
    def kafka_version(self) -> str:
        return self.nodes[0].kafka_version


@dataclass(frozen=True)
class _Layout:
    """What ``cluster.json`` records."""

    cluster_id: str
    ports: dict[int, tuple[int, int]]  # node id -> (port, controller port)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{_kraft.HOST}:{port}" for port, _ in self.ports.values())


class LocalCluster:
    """Starts, finds and stops the local cluster the settings describe (``settings.nodes``)."""

    def __init__(self, settings: LocalBrokerSettings, *, nodes: int | None = None) -> None:
        self.settings = settings
        self.wanted = nodes or settings.nodes
        self.data_dir = settings.data_dir.expanduser().absolute()
        self.layout_file = self.data_dir / LAYOUT_FILE

    def size(self) -> int:
        """Nodes of the cluster formatted in ``data_dir`` (0: nothing there yet)."""
        layout = self._read_layout()
        if layout is not None:
            return len(layout.ports)
        single = (self.data_dir / "kraft" / "meta.properties", self.data_dir / STATE_FILE)
        return 1 if any(path.exists() for path in single) else 0

    def node(self, node_id: int) -> LocalBroker:
        """Node ``node_id`` (from 1) of the cluster on disk, to stop or inspect one node alone."""
        layout = self._read_layout()
        if layout is None:
            if node_id != 1:
                raise LocalBrokerError(f"{self.data_dir} holds a single node, not node {node_id}")
            return LocalBroker(self.settings)
        return self._node(layout, node_id)

    def start(self) -> ClusterInfo:
        """Start every node that is not running; wait until all answer and know each other."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self._lock():
            size = self.size()
            if size and size != self.wanted:
                raise LocalBrokerError(
                    f"{self.data_dir} holds a {size}-node cluster, not {self.wanted}: start it "
                    f"with --nodes {size} (local_broker.nodes), or choose another data_dir"
                )
            if self.wanted == 1:
                LocalBroker(self.settings).start()
            else:
                self._start_nodes(started + self.settings.start_timeout_s)
        info = self.status()
        if info is None:
            raise LocalBrokerError(f"the cluster in {self.data_dir} stopped while starting")
        logger.info(
            "local cluster ready nodes=%d bootstrap=%s seconds=%.1f",
            info.size, info.bootstrap_servers, time.monotonic() - started,
        )  # fmt: skip
        return info

    def _start_nodes(self, deadline: float) -> None:
        recorded = self._read_layout()
        running = recorded is not None and any(
            self._node(recorded, n).status() for n in recorded.ports
        )
        layout = recorded if running and recorded else self._choose_layout(recorded)
        self._write_layout(layout)
        nodes = [self._node(layout, n) for n in layout.ports]
        nodes[0].ensure_jars()  # once, before the nodes format and spawn side by side
        with ThreadPoolExecutor(len(nodes), thread_name_prefix="start-node") as pool:
            infos = list(pool.map(lambda node: node.start(wait=False), nodes))
        for node, info in zip(nodes, infos, strict=True):
            node.wait_ready(info, deadline)
        self._wait_for_brokers(layout, deadline)

    def _choose_layout(self, layout: _Layout | None) -> _Layout:
        """Ports for every node (all are down): the recorded ones where free, else others.

        Each node's preferred ports are ``port + 2(n-1)`` and ``controller_port + 2(n-1)``.
        The quorum is static (``controller.quorum.voters`` in every node's config), so
        ports may change between starts as long as all nodes change together.
        """
        cluster_id = layout.cluster_id if layout else _kraft.new_cluster_id()
        taken: list[int] = []
        ports: dict[int, tuple[int, int]] = {}
        for n in range(1, self.wanted + 1):
            offset = 2 * (n - 1)
            old = layout.ports.get(n) if layout else None
            port_wanted, controller_wanted = old or (
                self.settings.port + offset,
                self.settings.controller_port + offset,
            )
            port = _kraft.choose_port(port_wanted, taken=taken)
            controller = _kraft.choose_port(controller_wanted, taken=[*taken, port])
            taken += [port, controller]
            ports[n] = (port, controller)
        return _Layout(cluster_id, ports)

    def _wait_for_brokers(self, layout: _Layout, deadline: float) -> None:
        """Until a metadata answer lists every node as a broker."""
        admin = AdminClient(probe_conf(layout.bootstrap))
        while True:
            with contextlib.suppress(KafkaException):
                if len(admin.list_topics(timeout=1.0).brokers) >= len(layout.ports):
                    return
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"the {len(layout.ports)} nodes at {layout.bootstrap} did not all register "
                    f"within {self.settings.start_timeout_s:.0f} s; logs: {self.data_dir}/node-*/"
                )
            time.sleep(0.2)

    def status(self) -> ClusterInfo | None:
        """The running nodes, else None when none runs (a node still starting counts)."""
        layout = self._read_layout()
        if layout is None:
            single = LocalBroker(self.settings).status()
            if single is None:
                return None
            return ClusterInfo((single,), single.bootstrap_servers, 1, self.data_dir)
        nodes = [self._node(layout, n).status() for n in layout.ports]
        running = tuple(info for info in nodes if info is not None)
        if not running:
            return None
        return ClusterInfo(running, layout.bootstrap, len(layout.ports), self.data_dir)

    def stop(self, timeout_s: float = 30) -> bool:
        """Stop every node at once (SIGTERM, SIGKILL after ``timeout_s``); True if any ran.

        At once, not one by one: a node stopping last would wait for a quorum that is
        gone already. Each node still shuts down in order (its own logs flushed).
        """
        if not self.data_dir.is_dir():
            return False
        with self._lock():
            layout = self._read_layout()
            if layout is None:
                return LocalBroker(self.settings).stop(timeout_s)
            nodes = [self._node(layout, n) for n in layout.ports]
            with ThreadPoolExecutor(len(nodes), thread_name_prefix="stop-node") as pool:
                stopped = list(pool.map(lambda node: node.stop(timeout_s), nodes))
            return any(stopped)

    def controller(self) -> int | None:
        """The node id of the active controller (the quorum's leader), as the nodes last recorded.

        Read from each running node's ``quorum-state`` file (the newest epoch wins),
        not asked over the network: Kafka's clients are told a random broker, not
        the active controller (KIP-919).
        """
        best: tuple[int, int] | None = None
        info = self.status()
        for node in info.nodes if info else ():
            try:
                state = json.loads((node.data_dir / QUORUM_STATE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            epoch, leader = int(state.get("leaderEpoch", -1)), int(state.get("leaderId", -1))
            if leader > 0 and (best is None or epoch > best[0]):
                best = (epoch, leader)
        return best[1] if best else None

    def _node(self, layout: _Layout, node_id: int) -> LocalBroker:
        port, controller = layout.ports[node_id]
        voters = {n: c for n, (_, c) in layout.ports.items()}
        spec = NodeSpec(
            node_id, self._node_dir(node_id), port, controller, voters, layout.cluster_id
        )
        return LocalBroker(self.settings, node=spec)

    def _node_dir(self, node_id: int) -> Path:
        return self.data_dir / f"node-{node_id}"

    def _read_layout(self) -> _Layout | None:
        try:
            raw = json.loads(self.layout_file.read_text(encoding="utf-8"))
            ports = {int(n): (int(p[0]), int(p[1])) for n, p in raw["ports"].items()}
            return _Layout(str(raw["cluster_id"]), dict(sorted(ports.items())))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise LocalBrokerError(
                f"{self.layout_file} is unreadable ({exc}): it records the cluster's "
                "ports and id; remove the data dir to start from empty storage"
            ) from exc

    def _write_layout(self, layout: _Layout) -> None:
        state = {
            "nodes": len(layout.ports),
            "cluster_id": layout.cluster_id,
            "ports": {str(n): list(p) for n, p in layout.ports.items()},
        }
        tmp = self.layout_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.layout_file)

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return _kraft.file_lock(self.data_dir / ".cluster.lock")


def local_bootstrap(settings: LocalBrokerSettings) -> str | None:
    """``host:port[,host:port...]`` of the local broker or cluster when it runs, else None."""
    info = LocalCluster(settings).status()
    return info.bootstrap_servers if info else None
