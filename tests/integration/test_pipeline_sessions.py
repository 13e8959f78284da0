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
from typing import Any

from dspex.streams.client.client import AsyncClient, PipelineRef, RequestFailed, Result
from dspex.streams.pipelines.spec import Pipeline
from dspex.streams.serde import make_serde
from dspex.streams.sessions import find_session
from dspex.streams.settings import Settings
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


async def _turn(client: AsyncClient, question: str, session_id: str | None) -> Result:
    """One run of ``chat`` (retried while the router does not know the pipeline yet)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await client.submit(
                PipelineRef("chat"),
                {"question": question},
                session_id=session_id,
                deadline_s=90,
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
