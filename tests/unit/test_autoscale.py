"""Pool sizing from the learning agent's hints: clamping, newest table wins, settings bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from dspex.streams.cli.up import agent_commands
from dspex.streams.ops.autoscale import HintFollower, desired_processes, scalable
from dspex.streams.settings import (
    GeneralPoolSettings,
    PoolSettings,
    PoolsSettings,
    load_settings,
)


def test_hints_are_clamped_to_each_pools_bounds() -> None:
    pools = PoolsSettings(optimizer=PoolSettings(processes=1, max_processes=2))
    # defaults: general 2..4, optimizer 1..2 here, gpu fixed at 1
    assert desired_processes({}, pools) == {"general": 2, "optimizer": 1, "gpu": 1}
    hints = {"general": 9, "optimizer": 2, "gpu": 5}
    assert desired_processes(hints, pools) == {"general": 4, "optimizer": 2, "gpu": 1}
    assert desired_processes({"general": 1}, pools)["general"] == 2  # never below processes
    # hints come off the wire: values of the wrong type must be ignored, which mypy would refuse
    assert desired_processes({"general": True, "gpu": "3"}, pools) == {  # type: ignore[dict-item]
        "general": 2,
        "optimizer": 1,
        "gpu": 1,
    }
    assert scalable(pools)
    fixed = PoolSettings(processes=1)
    assert not scalable(
        PoolsSettings(
            general=GeneralPoolSettings(processes=2, max_processes=None), optimizer=fixed, gpu=fixed
        )
    )


def test_max_processes_below_processes_is_refused() -> None:
    with pytest.raises(ValidationError, match="max_processes=1 is below processes=2"):
        PoolSettings(processes=2, max_processes=1)


def test_the_newest_table_with_hints_wins() -> None:
    follower = HintFollower(load_settings())
    now = datetime.now(UTC)
    follower.take({"created_at": now, "pool_hints": {"general": 3}})
    follower.take({"created_at": now - timedelta(seconds=5), "pool_hints": {"general": 9}})
    follower.take({"created_at": now + timedelta(seconds=5), "pool_hints": {}})  # no hints
    assert follower.hints() == {"general": 3}
    follower.take({"created_at": now + timedelta(seconds=1), "pool_hints": {"general": 4}})
    assert follower.hints() == {"general": 4}


def test_agent_commands_follow_the_desired_counts() -> None:
    settings = load_settings()
    commands = agent_commands(settings, None, {"general": 3, "optimizer": 0, "gpu": 1})
    agents = ("router", "pipeline", "learner", "metrics", "sessions")
    workers = sorted(name for name in commands if name not in agents)
    assert workers == ["general-1", "general-2", "general-3", "gpu-1"]
    assert commands["general-3"][-4:] == ["--pool", "general", "--instance-id", "3"]
