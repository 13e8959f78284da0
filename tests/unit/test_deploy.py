"""The Kubernetes/KEDA manifests agree with the code: commands, topics, groups, metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML (locked via dspy) ships no type hints
from prometheus_client import CollectorRegistry

from dspex.agents.metrics.metrics import Exporter
from dspex.streams.settings import load_settings
from dspex.streams.topics import Topics

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
POOLS = ("general", "optimizer", "gpu")


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _exported() -> set[str]:
    registry = CollectorRegistry()
    Exporter(registry)
    return {metric.name for metric in registry.collect()}


def test_every_deployment_runs_a_real_agent_command() -> None:
    deployments = {d["metadata"]["name"]: d for d in _documents() if d["kind"] == "Deployment"}
    commands = {
        name: d["spec"]["template"]["spec"]["containers"][0]["command"]
        for name, d in deployments.items()
    }
    for agent in ("router", "pipeline", "learner", "metrics", "sessions"):
        assert commands[f"dspex-{agent}"] == ["python", "-m", "dspex.agents", agent]
    for pool in POOLS:
        assert commands[f"dspex-pool-{pool}"] == [
            "python",
            "-m",
            "dspex.agents",
            "worker",
            "--pool",
            pool,
        ]
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name


def test_keda_scales_each_pool_on_its_lag_and_the_learned_recommendation() -> None:
    settings = load_settings()
    topics = Topics(settings.topics)
    deployments = {d["metadata"]["name"] for d in _documents() if d["kind"] == "Deployment"}
    scaled = {d["metadata"]["name"]: d for d in _documents() if d["kind"] == "ScaledObject"}
    exported = _exported()
    for pool in POOLS:
        spec = scaled[f"dspex-pool-{pool}"]["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        config = getattr(settings.pools, pool)
        assert spec["minReplicaCount"] == config.processes
        # more consumers than partitions would sit idle
        assert spec["maxReplicaCount"] <= topics.spec(f"pool.{pool}").partitions
        triggers = {t["type"]: t["metadata"] for t in spec["triggers"]}
        assert triggers["kafka"]["topic"] == topics.name(f"pool.{pool}")
        assert triggers["kafka"]["consumerGroup"] == f"{settings.topics.prefix}pool.{pool}"
        query = triggers["prometheus"]["query"]
        assert query == f'max(dspex_pool_recommended_consumers{{pool="{pool}"}})'
        assert "dspex_pool_recommended_consumers" in exported
