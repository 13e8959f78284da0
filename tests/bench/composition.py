"""Figure 6, a pipeline's overhead per stage: a DSPex pipeline against the same composition
run in-process, in the same bench run.

The composition is a four-stage chain (retrieve -> draft -> check -> answer) with a map
(summarize, one execution per topic) beside it that the last stage also reads. Every stage
is an inline Predict answered by the SIMULATED LM ``dspex/sim?task=upper`` with a fixed
delay per call (not a model: the figure is DSPex's cost, not an LM's).

* **pipeline**: the router, one general worker and the pipeline agent as processes on the
  bench's broker; the pipeline is published as a PipelineVersion; runs are submitted with
  ``PipelineRef`` (``cache=False``, so every stage runs on the worker).
* **in-process**: the same stage programs built with ``ProgramBuilder``, run with
  ``runner.run`` and the same LM in this process, each stage started once the stages it
  reads are done and the map items at the same concurrency as the pipeline's.

Both run ``runs`` times one after another (latency) and ``runs`` at once (throughput).
Overhead per stage = (pipeline p50 - in-process p50) / stages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from confluent_kafka.admin import AdminClient

from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, run
from dspex.agents.runtime.tools import default_tools
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import now
from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, PipelineRef
from dspex.streams.pipelines.spec import DEFAULT_CONCURRENCY
from dspex.streams.serde import make_serde
from dspex.streams.settings import LMBackend, Settings, load_settings
from dspex.streams.topics import Topics
from tests.bench.config import BenchConfig, question
from tests.bench.stack import AgentProcess, Broker, wait_for_members
from tests.bench.stages import Stack
from tests.bench.stats import latency_ms, rate

PIPELINE_ID = "bench-chain"
DELAY_S = 0.02
SIM = f"dspex/sim?task=upper&delay={DELAY_S}"
"""A SIMULATED LM: each ``str`` output is the first input in upper case, after DELAY_S."""
TOPICS = 3
DEADLINE_S = 120.0


@dataclass(frozen=True)
class Stage:
    """One stage of the composition, in the pipeline spec's terms."""

    name: str
    signature: str
    inputs: Mapping[str, str]
    map_over: str | None = None

    def reads(self) -> set[str]:
        """The stages whose outputs this stage reads."""
        refs = [*self.inputs.values(), self.map_over or ""]
        return {ref.split(".")[1] for ref in refs if ref.startswith("$stage.")}


STAGES = (
    Stage("retrieve", "question -> passage", {"question": "$input.question"}),
    Stage("summarize", "topic -> summary", {"topic": "$item"}, map_over="$input.topics"),
    Stage("draft", "passage -> draft", {"passage": "$stage.retrieve.passage"}),
    Stage("check", "draft -> verdict", {"draft": "$stage.draft.draft"}),
    Stage(
        "answer",
        "verdict, summaries: list[str] -> answer",
        {"verdict": "$stage.check.verdict", "summaries": "$stage.summarize.summary"},
    ),
)
OUTPUTS = {"answer": "$stage.answer.answer", "summaries": "$stage.summarize.summary"}


def executions() -> int:
    """Stage executions per run (a map stage counts once per item)."""
    return sum(TOPICS if s.map_over else 1 for s in STAGES)


def pipeline_record() -> Record:
    """The composition as a PipelineVersion."""
    return records.pipeline_version(
        pipeline_id=PIPELINE_ID,
        version=1,
        inputs="question, topics: list[str]",
        stages=[_stage_record(s) for s in STAGES],
        outputs=OUTPUTS,
        created_at=now(),
    )


def _stage_record(stage: Stage) -> Record:
    """One stage: an inline Predict on the general pool; a map runs all its items at once."""
    return records.pipeline_stage(
        name=stage.name,
        signature=stage.signature,
        inputs=dict(stage.inputs),
        pool_hint="general",
        map_over=stage.map_over,
        # a stage that is not a map keeps the default: another value is refused
        map_concurrency=TOPICS if stage.map_over else DEFAULT_CONCURRENCY,
    )


def run_inputs(i: int) -> dict[str, Any]:
    """Run ``i``'s inputs (unique, so nothing could be answered from a cache)."""
    return {"question": question(i), "topics": [f"topic {t} of run {i}" for t in range(TOPICS)]}


def sim_settings(settings: Settings) -> Settings:
    """``settings``' broker and prefix with the general pool on the delayed simulation."""
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={
            "backends": {"sim": {"model": SIM}},
            "default_variant": "sim",
            "pool_variants": {"general": "sim"},
        },
    )


# -- in-process --------------------------------------------------------------------------------


def _resolve(ref: str, inputs: Mapping[str, Any], done: Mapping[str, Any], item: Any) -> Any:
    if ref == "$item":
        return item
    kind, name, *rest = ref.split(".")
    if kind == "$input":
        return inputs[name]
    return done[name][rest[0]]


@dataclass
class InProcess:
    """The composition's stage programs, built once, run with one LM in this process."""

    lm: dspy.BaseLM = field(default_factory=lambda: build_lm(LMBackend(model=SIM)))
    modules: dict[str, dspy.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        builder = ProgramBuilder(default_tools())
        self.modules = {s.name: builder.build(ProgramSpec(s.signature)) for s in STAGES}

    async def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """One run: each stage starts once the stages it reads are done."""
        done: dict[str, dict[str, Any]] = {}
        ready = {s.name: asyncio.Event() for s in STAGES}

        async def one(stage: Stage, item: Any = None) -> dict[str, Any]:
            args = {k: _resolve(v, inputs, done, item) for k, v in stage.inputs.items()}
            return (await run(self.modules[stage.name], args, lm=self.lm)).outputs

        async def stage_task(stage: Stage) -> None:
            for name in stage.reads():
                await ready[name].wait()
            if stage.map_over is None:
                done[stage.name] = await one(stage)
            else:
                items = _resolve(stage.map_over, inputs, done, None)
                outs = await asyncio.gather(*(one(stage, item) for item in items))
                done[stage.name] = {k: [o[k] for o in outs] for k in outs[0]} if outs else {}
            ready[stage.name].set()

        await asyncio.gather(*(stage_task(s) for s in STAGES))
        return {name: _resolve(ref, inputs, done, None) for name, ref in OUTPUTS.items()}


# -- measuring ---------------------------------------------------------------------------------

RunOnce = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def _sequential(once: RunOnce, runs: int, offset: int) -> tuple[dict[str, Any], list[Any]]:
    durations, outputs = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        outputs.append(await once(run_inputs(offset + i)))
        durations.append(time.perf_counter() - t0)
    return latency_ms(durations), outputs


async def _concurrent(once: RunOnce, runs: int, offset: int) -> dict[str, Any]:
    started = time.perf_counter()
    await asyncio.gather(*(once(run_inputs(offset + i)) for i in range(runs)))
    return {"runs": runs, "runs_per_s": rate(runs, time.perf_counter() - started)}


async def _measure(once: RunOnce, runs: int, offset: int) -> tuple[dict[str, Any], list[Any]]:
    await once(run_inputs(offset - 1))  # warm-up: programs built, connections open
    sequential, outputs = await _sequential(once, runs, offset)
    concurrent = await _concurrent(once, runs, offset + runs)
    return {"sequential_ms": sequential, "concurrent": concurrent}, outputs


def publish(settings: Settings) -> None:
    """Produce the PipelineVersion to ``pipelines`` and wait for the broker's ack."""
    topic = Topics(settings.topics).name("pipelines")
    value = make_serde(settings).encode("PipelineVersion", pipeline_record(), topic=topic)
    producer = kafka.producer(settings)
    producer.produce(topic, value, PIPELINE_ID.encode())
    if producer.flush(30):
        raise RuntimeError("the bench pipeline was not acknowledged by the broker")


async def measure(
    settings: Settings, cfg: BenchConfig, broker: Broker, workdir: Path, admin: AdminClient
) -> dict[str, Any]:
    """Figure 6: the pipeline on the broker and the same composition in-process."""
    runs = cfg.composition_runs
    settings = sim_settings(settings)
    inprocess, expected = await _measure(InProcess(), runs, offset=3 * 10**7)
    publish(settings)
    stack = Stack(settings, cfg, broker, workdir)
    stack.start_router()
    stack.add_workers(1)
    agent = AgentProcess("pipeline", ["pipeline"], stack.env, workdir, None)
    try:
        await stack.wait_ready(admin)
        group = f"{settings.topics.prefix}pipeline"
        await asyncio.to_thread(wait_for_members, admin, group, 1, [agent])
        async with AsyncClient(settings) as client:

            async def once(inputs: dict[str, Any]) -> dict[str, Any]:
                ref = PipelineRef(PIPELINE_ID)
                result = await client.submit(ref, inputs, cache=False, deadline_s=DEADLINE_S)
                return dict(result.outputs)

            piped, outputs = await _measure(once, runs, offset=3 * 10**7)
    finally:
        exit_codes = {"pipeline": agent.stop(), **stack.stop()}
    return summarize(inprocess, piped, outputs == expected, exit_codes)


def summarize(
    inprocess: dict[str, Any], piped: dict[str, Any], same_outputs: bool, exit_codes: Any
) -> dict[str, Any]:
    """The report section: both sides, and the overhead per stage and the ratios."""
    stages = len(STAGES)
    pipe_p50, local_p50 = piped["sequential_ms"]["p50"], inprocess["sequential_ms"]["p50"]
    pipe_rate = piped["concurrent"]["runs_per_s"]
    local_rate = inprocess["concurrent"]["runs_per_s"]
    return {
        "lm": f"SIMULATION {SIM}",
        "stages": stages,
        "stage_executions": executions(),
        "pipeline": piped,
        "in_process": inprocess,
        "same_outputs": same_outputs,
        "overhead_per_stage_p50_ms": round((pipe_p50 - local_p50) / stages, 3),
        "latency_ratio_p50": round(pipe_p50 / local_p50, 3),
        "throughput_ratio": round(pipe_rate / local_rate, 3) if local_rate else 0.0,
        "exit_codes": exit_codes,
    }
