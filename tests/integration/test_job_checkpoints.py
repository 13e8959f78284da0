"""A long optimizer job whose runner is SIGKILLed resumes from its checkpoint on the other runner.

Real broker, router, general-pool worker and two ``python -m dspex.agents jobs``
runners (:mod:`tests.integration.test_optimizer`); the LM is the ``dspex/sim``
**simulation** that answers right only at temperature <= 0.4, slowed down so a
variable search of six trials takes a while. The runner doing the job is killed
once two trials are reported; the survivor must not redo the baseline or those
trials: it reports the resume, then only later trials, and the evaluation
requests tagged with the job id number at most one trial more than a single run
needs (the trial the victim had in flight when it died).
"""

from __future__ import annotations

import time

from dspex.streams.client.client import AsyncClient
from dspex.streams.client.jobs import JobProgress
from dspex.streams.settings import Settings
from tests.integration.tail import OpenTail
from tests.integration.test_end_to_end import start_stack  # noqa: F401 - fixture used by name
from tests.integration.test_optimizer import (  # noqa: F401 - fixture used by name
    DATASET,
    JOB_OUTPUTS,
    LOWTEMP,
    StartOptimizer,
    _finals,
    sim_settings,
    start_optimizer,
)

STEPS = 6
VAL = 4  # DATASET's 8 words, val_fraction 0.5


async def test_a_killed_runners_job_resumes_from_its_checkpoint(
    settings: Settings,
    start_optimizer: StartOptimizer,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = sim_settings(settings, LOWTEMP + "&delay=1.0", temperature=0.8)
    _, runners = start_optimizer(settings, 2)
    tail = tails([*JOB_OUTPUTS, "jobs.checkpoints"], settings=settings)
    seen: list[tuple[str, str, int]] = []  # (worker, phase, trial) of each progress chunk
    victim, killed_at = "", 0.0
    async with AsyncClient(settings) as client:
        await client.publish_program("toy", "word -> answer")
        job_id = await client.submit_job(
            "toy",
            dataset=DATASET,
            metric="exact_match",
            search={"temperature": {"min": 0, "max": 1, "steps": STEPS}},
        )
        async for chunk in client.follow_job(job_id, timeout_s=300):
            if chunk.final:
                final = chunk
                continue
            progress = JobProgress.from_chunk(chunk)
            seen.append((str(progress.worker), progress.phase, progress.trial))
            if progress.phase == "search" and progress.trial == 2 and not victim:
                victim = runners.kill_worker(str(progress.worker))
                killed_at = time.monotonic()
    recovered_s = time.monotonic() - killed_at
    assert victim, "the job never reached its second trial"
    assert final.status == "ok" and final.outputs is not None
    tail.catch_up()
    survivor = runners.processes[next(n for n in runners.processes if n != victim)].pid
    after = [(phase, trial) for worker, phase, trial in seen if worker.endswith(f":{survivor}")]
    redone = [trial for phase, trial in after if phase == "search" and trial <= 2]
    evaluations = [r for r in tail.of("executions") if r["metadata"].get("dspex-job") == job_id]
    checkpoints = [r for r in tail.of("jobs.checkpoints") if r["job_id"] == job_id]
    print(
        f"\nSIGKILL of {victim} after trial 2 of {STEPS}: survivor reported {after}; "
        f"evaluation requests {len(evaluations)} (one run: {(1 + STEPS) * VAL}); "
        f"checkpoints written {len(checkpoints)}; done {recovered_s:.1f}s after the kill"
    )
    assert ("resume", 0) in after  # the survivor resumed from the checkpoint ...
    assert not redone  # ... and did not redo the trials reported before the kill
    assert [trial for phase, trial in after if phase == "search"][-1] == STEPS
    assert len(evaluations) <= (1 + STEPS + 1) * VAL  # at most the victim's in-flight trial again
    assert len(_finals(tail, job_id)) == 1
    assert len(final.outputs["trials"]) == STEPS
