"""The local cluster launcher and replication choices without a broker.

Quorum config text, replication from the cluster's size, the cluster's layout on
disk, and status/stop over stand-in processes (argv markers of a real node).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException

from dspex.streams.errors import ConfigError, LocalBrokerError, TopicConfigError
from dspex.streams.ops import _kraft
from dspex.streams.ops import admin as admin_module
from dspex.streams.ops.admin import Replication, replication_for
from dspex.streams.ops.cluster import LocalCluster, local_bootstrap
from dspex.streams.settings import LocalBrokerSettings, TopicSettings, load_settings


@pytest.fixture
def settings(tmp_path: Path) -> LocalBrokerSettings:
    return LocalBrokerSettings(
        nodes=3,
        port=_kraft.free_port(),
        controller_port=_kraft.free_port(),
        cache_dir=tmp_path / "cache",
        data_dir=tmp_path / "data",
        start_timeout_s=10,
    )


# --- server.properties of a quorum node -----------------------------------------------------


def quorum_node(tmp_path: Path, node_id: int = 2) -> dict[str, str]:
    path = tmp_path / "server.properties"
    voters = {1: 19093, 2: 19095, 3: 19097}
    text = _kraft.server_properties(tmp_path / "kraft", 19094, 19095, node_id=2, voters=voters)
    path.write_text(text)
    return _kraft.read_properties(path)


def test_quorum_node_names_every_voter(tmp_path: Path) -> None:
    props = quorum_node(tmp_path)
    assert props["node.id"] == "2"
    assert props["process.roles"] == "broker,controller"
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    assert props["controller.quorum.voters"] == voters
    assert "controller.quorum.bootstrap.servers" not in props
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19094,CONTROLLER://127.0.0.1:19095"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("offsets.topic.replication.factor", "3"),
        ("transaction.state.log.replication.factor", "3"),
        ("transaction.state.log.min.isr", "2"),
        ("share.coordinator.state.topic.replication.factor", "3"),
        ("share.coordinator.state.topic.min.isr", "2"),
        ("default.replication.factor", "3"),
        ("min.insync.replicas", "2"),
    ],
)
def test_quorum_node_replicates_internal_topics(tmp_path: Path, key: str, value: str) -> None:
    assert quorum_node(tmp_path)[key] == value


def test_single_node_keeps_its_standalone_quorum(tmp_path: Path) -> None:
    text = _kraft.server_properties(tmp_path, 19092, 19093)
    assert "controller.quorum.bootstrap.servers=127.0.0.1:19093\n" in text
    assert "controller.quorum.voters" not in text
    assert "\nmin.insync.replicas=1\n" in text


# --- replication ----------------------------------------------------------------------------


@pytest.mark.parametrize(("brokers", "factor", "isr"), [(1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 3, 2)])
def test_replication_from_the_cluster_size(brokers: int, factor: int, isr: int) -> None:
    assert replication_for(brokers) == Replication(factor, isr)
    assert replication_for(brokers).configs() == {"min.insync.replicas": str(isr)}


def test_settings_decide_replication_where_set() -> None:
    assert replication_for(5, TopicSettings(replication_factor=5)) == Replication(5, 2)
    explicit = TopicSettings(replication_factor=3, min_insync_replicas=3)
    assert replication_for(3, explicit) == Replication(3, 3)
    assert replication_for(3, TopicSettings(min_insync_replicas=1)) == Replication(3, 1)


def test_a_factor_beyond_the_cluster_is_refused_by_name() -> None:
    with pytest.raises(TopicConfigError, match=r"replication_factor=3 .* 1 broker"):
        replication_for(1, TopicSettings(replication_factor=3))


def test_min_isr_above_the_factor_is_refused() -> None:
    with pytest.raises(ConfigError, match="min_insync_replicas 3 > replication_factor 2"):
        load_settings(topics={"replication_factor": 2, "min_insync_replicas": 3})


# --- the cluster on disk --------------------------------------------------------------------


def write_layout(cluster: LocalCluster, ports: dict[int, tuple[int, int]]) -> None:
    cluster.data_dir.mkdir(parents=True, exist_ok=True)
    layout = {"nodes": 3, "cluster_id": "x", "ports": {str(n): list(p) for n, p in ports.items()}}
    cluster.layout_file.write_text(json.dumps(layout))


PORTS = {1: (1, 2), 2: (3, 4), 3: (5, 6)}


@pytest.fixture
def stand_ins(settings: LocalBrokerSettings) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Three processes with a node's argv markers (``kafka.Kafka`` and its config path),
    each in its own session like the real JVMs, recorded in each node's state file."""
    cluster = LocalCluster(settings)
    write_layout(cluster, PORTS)
    processes = []
    for n in PORTS:
        node = cluster.node(n)
        node.data_dir.mkdir(parents=True)
        argv = [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "kafka.Kafka",
            str(node.config),
        ]
        processes.append(subprocess.Popen(argv, start_new_session=True))
        state = {"bootstrap_servers": f"127.0.0.1:{PORTS[n][0]}", "pid": processes[-1].pid,
                 "kafka_version": "4.1.2", "node_id": n}  # fmt: skip
        node.state_file.write_text(json.dumps(state))
    yield processes
    for process in processes:
        process.kill()
        process.wait()


def test_status_and_stop_cover_every_node(
    settings: LocalBrokerSettings, stand_ins: list[subprocess.Popen[bytes]]
) -> None:
    cluster = LocalCluster(settings)
    assert cluster.size() == 3
    info = cluster.status()
    assert info is not None
    assert [n.node_id for n in info.nodes] == [1, 2, 3] and info.down == ()
    everyone = "127.0.0.1:1,127.0.0.1:3,127.0.0.1:5"
    assert info.bootstrap_servers == everyone
    assert local_bootstrap(settings) == everyone
    stand_ins[1].kill()
    stand_ins[1].wait()
    degraded = cluster.status()
    assert degraded is not None and degraded.down == (2,)
    assert degraded.bootstrap_servers == everyone  # clients keep every address
    assert cluster.stop(timeout_s=5) is True
    assert all(p.wait(timeout=5) is not None for p in stand_ins)
    assert cluster.status() is None
    assert local_bootstrap(settings) is None


def test_active_controller_is_read_from_the_newest_quorum_state(
    settings: LocalBrokerSettings, stand_ins: list[subprocess.Popen[bytes]]
) -> None:
    cluster = LocalCluster(settings)
    assert cluster.controller() is None  # no node has written its quorum state yet
    for n, (leader, epoch) in {1: (2, 4), 2: (3, 5), 3: (-1, 6)}.items():
        path = cluster.node(n).data_dir / "kraft" / "__cluster_metadata-0" / "quorum-state"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"leaderId": leader, "leaderEpoch": epoch}))
    # node 3 is between elections (no leader at epoch 6): the newest known leader is node 3
    assert cluster.controller() == 3


def test_another_node_count_than_the_storage_is_refused(settings: LocalBrokerSettings) -> None:
    write_layout(LocalCluster(settings), PORTS)
    with pytest.raises(LocalBrokerError, match="holds a 3-node cluster, not 1: start it with"):
        LocalCluster(settings, nodes=1).start()


def test_a_single_broker_on_disk_is_a_one_node_cluster(settings: LocalBrokerSettings) -> None:
    cluster = LocalCluster(settings)
    assert cluster.size() == 0
    (cluster.data_dir / "kraft").mkdir(parents=True)
    (cluster.data_dir / "kraft" / "meta.properties").write_text("node.id=1\n")
    assert cluster.size() == 1
    assert cluster.node(1).data_dir == cluster.data_dir
    with pytest.raises(LocalBrokerError, match="holds a 1-node cluster, not 3"):
        cluster.start()


def test_each_node_gets_its_own_ports(settings: LocalBrokerSettings) -> None:
    layout = LocalCluster(settings)._choose_layout(None)
    chosen = [p for pair in layout.ports.values() for p in pair]
    assert len(set(chosen)) == 6
    assert layout.ports[1] == (settings.port, settings.controller_port)  # free: kept


def test_an_unreadable_layout_names_the_file(settings: LocalBrokerSettings) -> None:
    cluster = LocalCluster(settings)
    cluster.data_dir.mkdir(parents=True)
    cluster.layout_file.write_text("{not json")
    with pytest.raises(LocalBrokerError, match=r"cluster\.json is unreadable"):
        cluster.status()


class _SlowCluster:
    """An admin client whose cluster answers only from the third metadata request on."""

    def __init__(self) -> None:
        self.calls = 0

    def list_topics(self, timeout: float) -> Any:
        self.calls += 1
        if self.calls < 3:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))
        return SimpleNamespace(topics={"dspex.requests": SimpleNamespace(partitions={0: 0, 1: 1})})


def test_required_topics_wait_for_an_unreachable_cluster_then_answer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    slept: list[float] = []
    monkeypatch.setattr("dspex.streams.ops.admin.time.sleep", slept.append)
    cluster = _SlowCluster()
    found = admin_module.require_topics(cast(Any, cluster), ["dspex.requests"], "router")
    assert found == {"dspex.requests": 2} and cluster.calls == 3
    assert slept == [1.0, 2.0]  # back-off, not a busy loop
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # logged once, however long the wait
