"""A pipeline running in a session, on a real broker: History stages see the session, a run
is one turn.

The router, a general-pool worker and the pipeline agent run as processes. The LM is the
``dspex/sim?task=recall`` SIMULATION: its answer is the first input of every user turn in
the prompt, so an answer shows exactly which history the stage program was given
(DSPy renders a ``History`` input's messages as earlier user turns).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

from dspex.streams.client.client import AsyncClient, PipelineRef, RequestFailed, Result
from dspex.streams.pipelines.spec import Pipeline
from dspex.streams.serde import make_serde
from dspex.streams.sessions import find_session
from dspex.streams.settings import Settings, load_settings
from tests.integration.tail import until
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)
from tests.integration.test_pipelines import publish
from tests.integration.test_sessions import recall_settings

CHAT = (
    Pipeline("chat", inputs="question")
    .stage("reply", program="chat.reply", inputs={"question": "$input.question"})
    .stage("again", signature="text -> said", inputs={"text": "$stage.reply.answer"})
    .output(answer="$stage.reply.answer", said="$stage.again.said")
)


async def _turn(
    client: AsyncClient, question: str, session_id: str | None, deadline_s: float = 90
) -> Result:
    """One run of ``chat`` (retried while the router does not know the pipeline yet)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await client.submit(
                PipelineRef("chat"),
                {"question": question},
                session_id=session_id,
                deadline_s=deadline_s,
                cache=False,
            )
        except RequestFailed as exc:
            if exc.field != "pipeline_id" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.3)


async def test_history_stages_see_the_sessions_earlier_runs_and_each_run_is_one_turn(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
) -> None:
    settings = recall_settings(settings)
    start_stack(settings, ["general"], pipeline=True)
    async with AsyncClient(settings) as client:
        assert await client.publish_program("chat.reply", "question, history: History -> answer")
        publish(settings, CHAT.to_record(version=1))
        answers: list[Result] = []
        for question in ("alpha", "bravo", "charlie"):
            answers.append(await _turn(client, question, "conv-1"))
        alone = await _turn(client, "delta", None)
        other = await _turn(client, "echo", "conv-2")
    print("\n" + "\n".join(f"turn {r.session}: {r.outputs}" for r in answers))

    # each run's History stage saw the earlier runs of the session, oldest first
    assert [r.outputs["answer"] for r in answers] == [
        "alpha",
        "alpha | bravo",
        "alpha | bravo | charlie",
    ]
    assert [r.outputs["said"] for r in answers] == [r.outputs["answer"] for r in answers]
    assert [(r.session or {}).get("turn") for r in answers] == [1, 2, 3]
    assert [(r.session or {}).get("fresh") for r in answers] == [True, False, False]
    # outside a session, or in another one, nothing of conv-1 is seen
    assert alone.outputs["answer"] == "delta" and alone.session is None
    assert other.outputs["answer"] == "echo" and (other.session or {}).get("turn") == 1

    # one turn per run (the stages recorded nothing), written by the pipeline agent
    state = find_session(settings, make_serde(settings), "conv-1").state
    assert state is not None
    turns = state["turns"]
    assert [t["request_id"] for t in turns] == [r.request_id for r in answers]
    assert {t["pipeline_id"] for t in turns} == {"chat"}
    assert [json.loads(t["inputs"]["question"]) for t in turns] == ["alpha", "bravo", "charlie"]
    assert [_decoded(t["outputs"]) for t in turns] == [r.outputs for r in answers]
    assert state["counters"]["turns"] == 3
    assert state["writer"] == f"{settings.topics.prefix}pipeline"


def _decoded(outputs: dict[str, str]) -> dict[str, Any]:
    return {name: json.loads(value) for name, value in outputs.items()}


SESSIONS = 10
TURNS = 3


async def test_kill_9_of_the_pipeline_agent_loses_and_doubles_no_session_turn(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
) -> None:
    """Ten sessions converse with the pipeline, three runs each, while the agent is killed."""
    settings = load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={
            "backends": {"recall": {"model": "dspex/sim?task=recall&delay=0.3"}},
            "pool_variants": {"general": "recall"},
        },
        reliability={"session_timeout_s": 6.0},
    )
    stack = start_stack(settings, ["general"], pipeline=True)
    answered_at: list[float] = []

    async def converse(client: AsyncClient, n: int) -> list[Result]:
        results = []
        for turn in range(1, TURNS + 1):
            results.append(await _turn(client, f"s{n}t{turn}", f"conv-{n}", deadline_s=240))
            answered_at.append(time.monotonic())
        return results

    async with AsyncClient(settings) as client:
        assert await client.publish_program("chat.reply", "question, history: History -> answer")
        publish(settings, CHAT.to_record(version=1))
        await _turn(client, "warm-up", None)  # the router and agent know the pipeline
        answered_at.clear()
        tasks = [asyncio.create_task(converse(client, n)) for n in range(SESSIONS)]
        await until(lambda: len(answered_at) >= 8, 180, "8 runs answered before the kill")
        before = len(answered_at)
        killed_at, killed_wall = time.monotonic(), time.time()
        stack.kill("pipeline")
        stack.launch("pipeline")
        conversations = await asyncio.gather(*tasks)
    after = [t - killed_at for t in answered_at if t > killed_at]
    serde = make_serde(settings)
    doubled = lost = 0
    wrong: list[int] = []
    for n, results in enumerate(conversations):
        asked = [f"s{n}t{turn}" for turn in range(1, TURNS + 1)]
        state = find_session(settings, serde, f"conv-{n}").state
        recorded = [t["request_id"] for t in (state or {}).get("turns", [])]
        doubled += len(recorded) - len(set(recorded))
        lost += len({r.request_id for r in results} - set(recorded))
        # every run saw exactly the runs before it, and each is recorded once, in order
        seen = [r.outputs["answer"] for r in results]
        turns = [(r.session or {}).get("turn") for r in results]
        if (
            seen != [" | ".join(asked[: k + 1]) for k in range(TURNS)]
            or turns != [1, 2, 3]
            or recorded != [r.request_id for r in results]
        ):
            wrong.append(n)
    ready = [line for line in stack.log_text("pipeline").splitlines() if "agent ready" in line]
    ready_at = datetime.strptime(ready[-1][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    print(
        f"\nsessions={SESSIONS} runs={SESSIONS * TURNS} answered_before_kill={before} "
        f"answered_after={len(after)} turns_lost={lost} turns_doubled={doubled} "
        f"sessions_wrong={len(wrong)} "
        f"kill_to_restarted_agent_ready_s={ready_at - killed_wall:.2f} "
        f"kill_to_last_answer_s={max(after):.2f}"
    )
    assert (lost, doubled, wrong) == (0, 0, [])
