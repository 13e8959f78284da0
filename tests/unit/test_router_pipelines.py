"""The router's side of pipeline runs, without a broker: checked, pinned, handed to the agent."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from dspex.agents.plumbing.catalog import PipelineCatalog, ProgramCatalog
from dspex.agents.router.pipelines import CheckedPipelines
from dspex.agents.router.router import RouterHandler
from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams.errors import InvalidRequest
from tests.unit.test_router import NOW_MS, SERDE, decode, incoming
from tests.unit.test_router import handler as router_handler


def handler() -> RouterHandler:
    pipelines = PipelineCatalog()
    for version in (1, 2):
        record = records.pipeline_version(
            pipeline_id="support",
            version=version,
            inputs="question, topics: list[str]",
            stages=[
                records.pipeline_stage(
                    name="s", signature="q -> a", inputs={"q": "$input.question"}
                )
            ],
            outputs={"a": "$stage.s.a"},
            created_at=now(),
        )
        pipelines.apply(
            "support",
            SERDE.decode(SERDE.encode("PipelineVersion", record, topic="p"), topic="p").record,
        )
    return router_handler(pipelines=pipelines)


def run(**fields: Any) -> dict[str, Any]:
    inputs = {"question": json.dumps("why?"), "topics": json.dumps(["a", "b"])}
    return {
        "request_id": str(uuid.uuid4()),
        "created_at": NOW_MS,
        "pipeline_id": "support",
        "inputs": inputs,
        **fields,
    }


def test_a_good_run_goes_to_the_pipeline_agent_pinned_to_the_latest_version() -> None:
    out = handler().handle_request(incoming(run()))
    assert [o.topic for o in out] == ["dspex.pipeline.runs"] and out[0].key == b"key"
    assert decode(out[0].value)["pipeline_version"] == 2


def test_a_bad_run_gets_one_error_naming_the_field_and_a_dead_letter() -> None:
    cases = [
        (run(pipeline_id="nope"), "pipeline_id"),
        (run(pipeline_version=9), "pipeline_version"),
        (run(inputs={"question": json.dumps("why?")}), "inputs.topics"),
        (run(inputs={"question": "1", "topics": "[]"}), "inputs.question"),
        (run(signature="q -> a"), "signature"),
    ]
    for record, field in cases:
        out = handler().handle_request(incoming(record))
        assert [o.topic for o in out] == ["dspex.responses", "dspex.dlq"], field
        error = decode(out[0].value)["error"]
        assert (error["field"], error["stage"]) == (field, "validate")


def test_a_stage_request_may_name_the_pipeline_agents_reply_topic_only() -> None:
    stage = {
        "request_id": str(uuid.uuid4()),
        "created_at": NOW_MS,
        "signature": "question -> answer",
        "inputs": {"question": json.dumps("q")},
    }
    ok = handler().handle_request(incoming({**stage, "reply_topic": "dspex.pipeline.replies"}))
    assert [o.topic for o in ok] == ["dspex.pool.general"]
    refused = handler().handle_request(incoming({**stage, "reply_topic": "dspex.pipeline.runs"}))
    assert decode(refused[0].value)["error"]["field"] == "reply_topic"


def _registered(pipelines: PipelineCatalog, program: str = "p") -> None:
    stage = records.pipeline_stage(name="s", program_id=program, inputs={"q": "$input.question"})
    record = records.pipeline_version(
        pipeline_id="reg",
        version=1,
        inputs="question",
        stages=[stage],
        outputs={"a": "$stage.s.a"},
        created_at=now(),
    )
    pipelines.apply("reg", record)


def test_a_pipeline_version_is_validated_once_until_the_programs_catalog_changes() -> None:
    programs = ProgramCatalog()
    pipelines = PipelineCatalog()
    _registered(pipelines)
    checked = CheckedPipelines(programs)
    version = pipelines.resolve("reg", None)
    for _ in range(3):  # no program p yet: refused, every time, from one validation
        with pytest.raises(InvalidRequest, match="no program 'p'"):
            checked.plan(version)
    assert checked.checks == 1
    programs.apply("p", sample_program("p", "q -> a"))
    plan = checked.plan(version)
    assert [s.name for s in plan.stages] == ["s"] and checked.checks == 2
    assert checked.plan(version) is plan and checked.checks == 2
    _registered(pipelines)  # the same version re-read (another record): checked again
    assert checked.plan(pipelines.resolve("reg", None)) is not plan and checked.checks == 3


def sample_program(program_id: str, signature: str) -> dict[str, Any]:
    return {"program_id": program_id, "version": 1, "signature": signature}
