"""The agent commands: each freezes its start-up heap before it starts serving."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from dspex.agents import cli
from dspex.agents.worker import worker


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session collects as usual


def test_the_startup_heap_is_frozen_and_what_comes_later_is_not() -> None:
    startup = [["built at start-up"] for _ in range(1000)]  # lists: always tracked
    cli.freeze_startup_heap()
    later = ["made while serving"]
    walked = {id(o) for o in gc.get_objects()}  # what a full collection walks
    assert gc.get_freeze_count() >= len(startup)
    assert not any(id(o) in walked for o in startup)
    assert id(later) in walked


@pytest.mark.parametrize(
    ("command", "factory"),
    [
        ("router", "dspex.agents.router.router.make_router"),
        ("pipeline", "dspex.agents.pipeline.agent.make_pipeline_agent"),
        ("learner", "dspex.agents.learner.learner.make_learner"),
        ("metrics", "dspex.agents.metrics.metrics.make_metrics"),
    ],
)
def test_a_stream_agent_freezes_its_heap_after_it_is_built_and_before_it_runs(
    command: str, factory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    class Agent:
        def __init__(self) -> None:
            seen.append(f"built frozen={gc.get_freeze_count() > 0}")

        def run(self) -> None:
            seen.append(f"run frozen={gc.get_freeze_count() > 0}")

    monkeypatch.setattr(factory, lambda settings, **options: Agent())
    result = CliRunner().invoke(cli.app, [command])
    assert result.exit_code == 0, result.output
    assert seen == ["built frozen=False", "run frozen=True"]


def test_a_pool_worker_freezes_its_heap_before_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen: list[bool] = []
    instances: list[str | None] = []

    def main(settings: object, pool: str, instance_id: str | None = None) -> int:
        frozen.append(gc.get_freeze_count() > 0)
        instances.append(instance_id)
        return 0

    monkeypatch.setattr(worker, "main", main)  # the module the worker command calls
    result = CliRunner().invoke(cli.app, ["worker", "--pool", "general"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli.app, ["worker", "--pool", "general", "--instance-id", "2"])
    assert result.exit_code == 0, result.output
    assert frozen == [True, True]
    assert instances == [None, "2"]
