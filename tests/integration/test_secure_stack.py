"""The whole of DSPex over SASL_SSL on the secured broker, as real processes.

Router, general pool worker, learning agent and an optimizer job runner run as
``python -m dspex.agents ...`` with settings naming the secured broker (SCRAM-SHA-512
over TLS, as ``dspex-admin``); the client submits a request and runs an optimizer job.
Routing uses the ``dspex/sim`` simulation (a deterministic stand-in LM, labelled so).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.stack import REPO, Stack, _live, agent_env
from tests.integration.tail import committed
from tests.integration.test_optimizer import DATASET, FEWSHOT, JobRunners


@pytest.fixture
def secure_sim(secure_settings: Settings) -> Settings:
    """The secured broker and this test's prefix; general and optimizer pools on a simulation."""
    return load_settings(
        kafka=secure_settings.kafka.model_dump(exclude_none=True),
        topics={"prefix": secure_settings.topics.prefix},
        lm={
            "backends": {"sim": {"model": FEWSHOT}},
            "pool_variants": {"general": "sim", "optimizer": "sim"},
        },
        learner={"publish_interval_s": 0.5, "refresh_interval_s": 2.0},
        jobs={"eval_deadline_s": 90.0},
    )


@pytest.fixture
def secure_stack(secure_sim: Settings, tmp_path: Path) -> Iterator[tuple[Stack, JobRunners]]:
    """Topics, router + general worker, the learner and one job runner; all stopped after."""
    topics = Topics(secure_sim.topics)
    ensure_topics(kafka.admin_client(secure_sim), topics.all())
    stack = Stack(secure_sim, ["general"], tmp_path)
    jobs = JobRunners(secure_sim, tmp_path)
    with (tmp_path / "learner.log").open("wb") as log:
        learner = subprocess.Popen(
            [sys.executable, "-m", "dspex.agents", "learner"],
            env=agent_env(secure_sim), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _live.add(learner)
    try:
        stack.start()
        jobs.start(1)
        yield stack, jobs
    finally:
        learner.terminate()
        learner.wait(45)
        _live.discard(learner)
        codes = jobs.stop()
        stack.stop()
    unclean = {n: c for n, c in stack.exit_codes.items() if c != 0} | {
        n: c for n, c in codes.items() if c != 0
    }
    learner_log = (tmp_path / "learner.log").read_text(errors="replace")
    assert not unclean, (unclean, stack.log_tails(), jobs.log_tails())
    assert learner.returncode == 0, learner_log[-3000:]


async def test_request_path_learner_and_optimizer_job_run_over_sasl_ssl(
    secure_sim: Settings, secure_stack: tuple[Stack, JobRunners]
) -> None:
    stack, _ = secure_stack
    async with AsyncClient(secure_sim) as client:
        assert await client.publish_program("toy", "word -> answer") == 1
        first = await client.submit("toy", {"word": "kafka"}, cache=False, deadline_s=120)
        result = await client.optimize(
            "toy", optimizer="BootstrapFewShot", dataset=DATASET, metric="exact_match",
            timeout_s=240,
        )  # fmt: skip
        print(f"\nover SASL_SSL: exact_match {result.score_before} -> {result.score_after}")
        assert result.ok, result.error
        assert (result.score_before, result.score_after, result.program_version) == (0.0, 1.0, 2)
        answer = await client.submit("toy", {"word": "stream"}, cache=False, deadline_s=120)
    assert (first.status, first.program_version) == ("ok", 1)
    assert (answer.program_version, answer.outputs["answer"]) == (2, "maerts")
    # the learning agent (faust, SCRAM over TLS) consumed and committed every Telemetry record
    await committed(secure_sim, f"{secure_sim.topics.prefix}learner", ["telemetry"], 120.0)
    stack.check_alive()
    assert "SASL authentication" not in stack.log_text("router")
