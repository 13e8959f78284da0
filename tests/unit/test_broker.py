"""The local broker launcher without a broker: config text, ports, state file, jar cache."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex.streams.errors import LocalBrokerError
from dspex.streams.ops import _kraft
from dspex.streams.ops.broker import LocalBroker
from dspex.streams.ops.cluster import local_bootstrap
from dspex.streams.settings import LocalBrokerSettings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> LocalBrokerSettings:
    return LocalBrokerSettings(
        port=_kraft.free_port(),
        controller_port=_kraft.free_port(),
        cache_dir=tmp_path / "cache",
        data_dir=tmp_path / "data",
        start_timeout_s=10,
    )


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def write_state(broker: LocalBroker, pid: int) -> None:
    broker.data_dir.mkdir(parents=True, exist_ok=True)
    state = {"bootstrap_servers": "127.0.0.1:1", "pid": pid, "kafka_version": "4.1.2"}
    broker.state_file.write_text(json.dumps(state))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- embedded copies -------------------------------------------------------------------


def test_embedded_pom_is_deploy_pom() -> None:
    assert (REPO / "deploy/kafka/pom.xml").read_text(encoding="utf-8") == _kraft.POM_XML


def test_embedded_log4j2_config_is_deploy_config() -> None:
    deployed = (REPO / "deploy/kafka/log4j2.properties").read_text(encoding="utf-8")
    assert deployed == _kraft.LOG4J2_PROPERTIES


def test_log4j2_config_writes_server_log_in_logs_dir() -> None:
    config = _kraft.LOG4J2_PROPERTIES
    assert "${sys:kafka.logs.dir}/server.log" in config
    assert "rootLogger.level = INFO" in config
    assert "logger.state.name = state.change.logger\nlogger.state.level = WARN" in config


# --- server.properties -----------------------------------------------------------------


def test_server_properties_single_node_kraft(tmp_path: Path) -> None:
    path = tmp_path / "server.properties"
    path.write_text(_kraft.server_properties(tmp_path / "kraft", 19092, 19093))
    props = _kraft.read_properties(path)
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"].startswith("PLAINTEXT://127.0.0.1:19092")
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["log.dirs"] == str(tmp_path / "kraft")
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.initial.rebalance.delay.ms"] == "0"


@pytest.mark.parametrize(
    "key",
    [
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
        "num.partitions",
    ],
)
def test_server_properties_single_replica(tmp_path: Path, key: str) -> None:
    text = _kraft.server_properties(tmp_path, 19092, 19093)
    assert f"\n{key}=1\n" in text


def test_server_properties_has_no_trailing_comments(tmp_path: Path) -> None:
    for line in _kraft.server_properties(tmp_path, 19092, 19093).splitlines():
        if line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key and value, line
        assert "#" not in value and value == value.strip(), line


# --- ports -----------------------------------------------------------------------------


def test_choose_port_keeps_a_free_preferred_port() -> None:
    port = _kraft.free_port()
    assert _kraft.choose_port(port) == port


def test_choose_port_falls_back_when_occupied(occupied_port: int) -> None:
    assert not _kraft.port_is_free(occupied_port)
    chosen = _kraft.choose_port(occupied_port)
    assert chosen != occupied_port
    assert _kraft.port_is_free(chosen)


def test_controller_port_never_equals_broker_port() -> None:
    port = _kraft.free_port()
    assert _kraft.choose_port(port, taken=(port,)) != port


# --- cluster id ------------------------------------------------------------------------


def test_cluster_id_looks_like_kafka_uuid() -> None:
    ids = {_kraft.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert set(cluster_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


# --- state file ------------------------------------------------------------------------


def test_status_none_without_state_file(settings: LocalBrokerSettings) -> None:
    assert LocalBroker(settings).status() is None
    assert local_bootstrap(settings) is None


def test_stale_pid_status_none_and_file_removed(settings: LocalBrokerSettings) -> None:
    broker = LocalBroker(settings)
    write_state(broker, dead_pid())
    assert broker.status() is None
    assert not broker.state_file.exists()


def test_reused_pid_of_another_program_is_stale(settings: LocalBrokerSettings) -> None:
    broker = LocalBroker(settings)
    write_state(broker, os.getpid())
    assert broker.status() is None
    assert not broker.state_file.exists()


def test_unreadable_state_file_is_removed(settings: LocalBrokerSettings) -> None:
    broker = LocalBroker(settings)
    broker.data_dir.mkdir(parents=True)
    broker.state_file.write_text("{not json")
    assert broker.status() is None
    assert not broker.state_file.exists()


def test_status_and_stop_of_a_live_broker_process(settings: LocalBrokerSettings) -> None:
    broker = LocalBroker(settings)
    # Stands in for the JVM: same argv markers, its own session like the real one.
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "kafka.Kafka", str(broker.config)]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        write_state(broker, proc.pid)
        info = broker.status()
        assert info is not None and info.pid == proc.pid
        assert info.log_file == settings.data_dir / "server.log"
        assert local_bootstrap(settings) == "127.0.0.1:1"
        assert broker.stop(timeout_s=5) is True
        assert proc.wait(timeout=5) is not None
        assert broker.status() is None
        assert broker.stop() is False
    finally:
        proc.kill()


def test_stop_without_broker_returns_false(settings: LocalBrokerSettings) -> None:
    assert LocalBroker(settings).stop() is False


# --- jars ------------------------------------------------------------------------------


FAKE_MVN = """echo run >> "{counter}"
for a in "$@"; do case "$a" in -DoutputDirectory=*) d="${{a#-DoutputDirectory=}}";; esac; done
mkdir -p "$d" && touch "$d/kafka_2.13-4.1.2.jar"
"""


def test_ensure_jars_downloads_once(
    settings: LocalBrokerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = tmp_path / "mvn-runs"
    write_script(tmp_path / "bin/mvn", FAKE_MVN.format(counter=counter))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    broker = LocalBroker(settings)
    jars = broker.ensure_jars()
    assert jars == settings.cache_dir / "kafka-4.1.2"
    assert (jars / "kafka_2.13-4.1.2.jar").is_file()
    assert (jars / _kraft.MARKER).is_file()
    assert broker.ensure_jars() == jars
    assert counter.read_text().count("run") == 1
    assert sorted(p.name for p in settings.cache_dir.iterdir()) == ["kafka-4.1.2"]


def test_ensure_jars_without_mvn(
    settings: LocalBrokerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LocalBrokerError, match="mvn not found on PATH"):
        LocalBroker(settings).ensure_jars()


def test_ensure_jars_failure_shows_mvn_output(
    settings: LocalBrokerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = 'echo "[ERROR] Could not transfer artifact org.apache.kafka:kafka_2.13"; exit 1\n'
    write_script(tmp_path / "bin/mvn", body)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(LocalBrokerError) as err:
        LocalBroker(settings).ensure_jars()
    assert "Could not transfer artifact" in str(err.value)
    assert "dependency:copy-dependencies" in str(err.value)
    assert list(settings.cache_dir.iterdir()) == []


# --- start failures --------------------------------------------------------------------


FAKE_JAVA = """case "$*" in
  *StorageTool*) exit 0;;
  *kafka.Kafka*) echo "Error: Could not reserve enough space for object heap"; exit 1;;
esac
exit 2
"""


def test_start_failure_reports_log_tail(
    settings: LocalBrokerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_script(tmp_path / "jdk/bin/java", FAKE_JAVA)
    settings = settings.model_copy(update={"java_home": tmp_path / "jdk"})
    jars = settings.cache_dir / "kafka-4.1.2"
    jars.mkdir(parents=True)
    (jars / _kraft.MARKER).write_text("test")
    broker = LocalBroker(settings)
    with pytest.raises(LocalBrokerError) as err:
        broker.start()
    message = str(err.value)
    assert "exited during start" in message
    assert "Could not reserve enough space" in message
    assert str(broker.config) in message
    assert broker.status() is None


def test_java_home_without_java(tmp_path: Path) -> None:
    with pytest.raises(LocalBrokerError, match="JAVA_HOME"):
        _kraft.java_executable(str(tmp_path))
