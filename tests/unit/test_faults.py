"""LM fault handling: retries with backoff, per-backend breakers, fallback, the error it ends in.

The failing backends are SIMULATIONS: :class:`ScriptedLM` is DSPex's EchoLM whose
engine first raises a scripted list of DSPy provider errors (the ``dspy.lm15``
errors a real engine raises, which DSPy maps to ``LMRateLimitError`` & co.) and
then answers like EchoLM. Sleeps are recorded, never slept; the clock is fake.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import dspy
import pytest
from dspy.lm15 import InvalidRequestError, RateLimitError, ServerError
from dspy.lm15 import Request as LMRequest
from dspy.lm15 import TimeoutError as ProviderTimeout

from dspex.agents.plumbing.records import telemetry
from dspex.agents.runtime.lms.base import ECHO_MODEL
from dspex.agents.runtime.lms.echo import AsyncEchoEngine, EchoEngine, EchoLM
from dspex.agents.worker.execution import DSPyExecutor, classify
from dspex.agents.worker.faults import (
    BackendsExhausted,
    BreakerBoard,
    FaultPolicy,
    RetryPolicy,
    is_retryable,
)
from dspex.schemas.samples import sample
from dspex.streams.errors import ProgramError
from dspex.streams.settings import Settings, load_settings


class ScriptedEngine(AsyncEchoEngine):
    """EchoLM's async engine that raises ``script``'s errors first (a labelled simulation)."""

    def __init__(self, script: list[Exception]) -> None:
        super().__init__(EchoEngine())
        self.script = list(script)
        self.calls = 0

    def _next_failure(self) -> None:
        self.calls += 1
        if self.script:
            raise self.script.pop(0)

    async def complete(self, request: LMRequest) -> Any:
        self._next_failure()
        return await super().complete(request)

    async def stream(self, request: LMRequest) -> Any:
        self._next_failure()
        async for event in super().stream(request):
            yield event


class ScriptedLM(EchoLM):
    """EchoLM failing as scripted, then echoing: a SIMULATION of a flaky provider."""

    def __init__(self, *script: Exception) -> None:
        self.engine_ = ScriptedEngine(list(script))
        dspy.LM.__init__(
            self,
            ECHO_MODEL,
            cache=False,
            num_retries=0,
            temperature=0.0,
            max_tokens=512,
            engine=self.engine_.sync,
            async_engine=self.engine_,
        )

    @property
    def calls(self) -> int:
        return self.engine_.calls


class Recorder:
    """An injected ``sleep`` and monotonic clock: sleeping only advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def _settings(**reliability: Any) -> Settings:
    backends = {"primary": {"model": "dspex/echo"}, "backup": {"model": "dspex/echo"}}
    return load_settings(
        lm={"backends": backends, "pool_variants": {"general": "backup"}},
        reliability=reliability,
    )


def _policy(recorder: Recorder, attempts: int = 3, fail_max: int = 5) -> FaultPolicy:
    return FaultPolicy(
        RetryPolicy(attempts=attempts, base_s=0.001, max_s=0.004),
        BreakerBoard(fail_max=fail_max, reset_timeout_s=60.0),
        sleep=recorder.sleep,
        rng=random.Random(7),
        clock=recorder.clock,
    )


def _request(variant: str = "primary", stream: bool = False, **changes: Any) -> dict[str, Any]:
    request = sample("Request")
    request.update(
        request_id=f"req-{uuid.uuid4()}",
        program_id=None,
        signature="question -> answer",
        module_type="Predict",
        module_config_json=None,
        state_json=None,
        tools=[],
        stream=stream,
        inputs={"question": '"What is 2 + 2?"'},
        variables={},
        deadline_at=datetime.now(UTC) + timedelta(seconds=30),
    )
    request["route"].update(pool="general", variant=variant)
    request.update(changes)
    return request


def _executor(
    recorder: Recorder, lms: dict[str, Any], attempts: int = 3, fail_max: int = 5
) -> DSPyExecutor:
    return DSPyExecutor(_settings(), faults=_policy(recorder, attempts, fail_max), lms=lms)


# -- the retry policy -------------------------------------------------------------------


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RetryPolicy(attempts=5, base_s=0.1, max_s=0.5)
    rng = random.Random(1)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        delays = [policy.delay(retry, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2  # full jitter


def test_backoff_honours_the_providers_retry_after() -> None:
    policy = RetryPolicy(base_s=0.01, max_s=0.02)
    assert policy.delay(1, random.Random(0), retry_after=1.5) == 1.5
    assert policy.delay(1, random.Random(0), retry_after=float("nan")) <= 0.01


def test_only_transient_lm_errors_are_retryable() -> None:
    assert is_retryable(dspy.LMRateLimitError("429"))
    assert is_retryable(dspy.LMServerError("500"))
    assert not is_retryable(dspy.LMInvalidRequestError("400"))
    assert not is_retryable(ProgramError("cannot parse"))
    assert not is_retryable(ValueError("bug"))


# -- the executor with scripted backends ------------------------------------------------


async def test_rate_limited_twice_then_answered_by_the_same_backend() -> None:
    recorder = Recorder()
    primary = ScriptedLM(RateLimitError("429"), RateLimitError("429"))
    executor = _executor(recorder, {"primary": primary, "backup": ScriptedLM()})
    outcome = await executor.execute(_request(), None)
    assert outcome.outputs == {"answer": "echo: What is 2 + 2?"}
    assert (outcome.variant, outcome.breaker_state, primary.calls) == ("primary", "closed", 3)
    assert len(recorder.sleeps) == 2
    assert 0 <= recorder.sleeps[0] <= 0.001 and 0 <= recorder.sleeps[1] <= 0.002


@pytest.mark.parametrize(
    "error",
    [InvalidRequestError("bad request"), ValueError("engine bug")],
    ids=["invalid-request", "unexpected"],
)
async def test_permanent_lm_errors_are_never_retried_nor_fallen_back(error: Exception) -> None:
    recorder = Recorder()
    primary, backup = ScriptedLM(error), ScriptedLM()
    executor = _executor(recorder, {"primary": primary, "backup": backup})
    with pytest.raises(dspy.LMError) as raised:
        await executor.execute(_request(), None)
    assert not is_retryable(raised.value)
    assert (primary.calls, backup.calls, recorder.sleeps) == (1, 0, [])
    assert executor.faults.breakers.state("primary") == "closed"


async def test_exhausted_retries_fall_back_to_the_pools_default_variant() -> None:
    recorder = Recorder()
    primary, backup = ScriptedLM(*[ServerError("503")] * 3), ScriptedLM()
    executor = _executor(recorder, {"primary": primary, "backup": backup})
    outcome = await executor.execute(_request(), None)
    assert (outcome.variant, primary.calls, backup.calls) == ("backup", 3, 1)
    assert outcome.outputs == {"answer": "echo: What is 2 + 2?"}


async def test_configured_fallbacks_come_before_the_pools_default() -> None:
    settings = _settings(fallbacks={"primary": ["echo"]})
    executor = DSPyExecutor(settings, faults=_policy(Recorder()))
    assert executor.variants(_request()) == ["primary", "echo", "backup"]
    assert executor.variants(_request(variant="backup")) == ["backup"]
    assert executor.variants(_request(variant="no-such-backend")) == ["backup"]


async def test_a_request_that_exhausts_every_backend_says_what_failed() -> None:
    recorder = Recorder()
    primary = ScriptedLM(*[RateLimitError("429")] * 3)
    backup = ScriptedLM(*[ProviderTimeout("provider timed out")] * 3)
    executor = _executor(recorder, {"primary": primary, "backup": backup})
    request = _request()
    with pytest.raises(BackendsExhausted) as raised:
        await executor.execute(request, None)
    message = str(raised.value)
    assert request["request_id"] in message
    assert "primary: LMRateLimitError after 3 call(s)" in message
    assert "backup: LMTimeoutError after 3 call(s)" in message
    failure = classify(raised.value)
    assert (failure.status, failure.error.error_class) == ("error", "BackendsExhausted")
    assert failure.error.retryable and failure.dead_letter
    assert len(recorder.sleeps) == 4  # two backoffs per backend


async def test_the_breaker_opens_after_fail_max_and_skips_the_backend() -> None:
    recorder = Recorder()
    primary, backup = ScriptedLM(*[RateLimitError("429")] * 4), ScriptedLM()
    executor = _executor(recorder, {"primary": primary, "backup": backup}, attempts=2, fail_max=4)
    for _ in range(2):  # 2 x 2 failed calls: the 4th opens the primary's circuit
        assert (await executor.execute(_request(), None)).variant == "backup"
    assert executor.faults.breakers.state("primary") == "open"
    calls_before = primary.calls
    outcome = await executor.execute(_request(), None)
    assert primary.calls == calls_before  # not called at all while open
    assert outcome.variant == "backup"


async def test_open_breakers_show_in_the_error_and_its_breaker_state() -> None:
    recorder = Recorder()
    lms = {"primary": ScriptedLM(ServerError("500")), "backup": ScriptedLM(ServerError("502"))}
    executor = _executor(recorder, lms, attempts=1, fail_max=1)
    with pytest.raises(BackendsExhausted) as first:
        await executor.execute(_request(), None)  # one failure each opens both circuits
    assert classify(first.value).breaker_state == "open"
    with pytest.raises(BackendsExhausted) as second:
        await executor.execute(_request(), None)
    assert "primary: CircuitOpen after 0 call(s)" in str(second.value)
    assert "backup: CircuitOpen after 0 call(s)" in str(second.value)
    assert (lms["primary"].calls, lms["backup"].calls) == (1, 1)


async def test_backoff_never_sleeps_past_the_deadline() -> None:
    recorder = Recorder()
    primary, backup = ScriptedLM(RateLimitError("429", retry_after=60.0)), ScriptedLM()
    executor = _executor(recorder, {"primary": primary, "backup": backup})
    outcome = await executor.execute(_request(), None)  # 60 s wait > 30 s deadline: fall back
    assert (outcome.variant, primary.calls, recorder.sleeps) == ("backup", 1, [])


async def test_a_partly_streamed_answer_is_never_replayed() -> None:
    recorder = Recorder()
    primary, backup = ScriptedLM(), ScriptedLM()
    chunks: list[str] = []

    async def on_chunk(delta: str) -> None:
        chunks.append(delta)
        if len(chunks) == 1:
            raise dspy.LMServerError("stream broke after the first token")

    executor = _executor(recorder, {"primary": primary, "backup": backup})
    with pytest.raises(BackendsExhausted):
        await executor.execute(_request(stream=True), on_chunk)
    assert (primary.calls, backup.calls, recorder.sleeps) == (1, 0, [])


def test_telemetry_names_the_answering_variant_and_its_breaker() -> None:
    from dspex.agents.plumbing.records import ExecutionResult
    from dspex.schemas.times import now

    t = now()
    result = ExecutionResult("ok", t, t, t, variant="backup", breaker_state="half-open")
    record = telemetry(_request(), result, worker_id="w", pool="general", in_flight=3)
    assert record["variant"] == "backup"
    health = record["health"]
    assert (health["in_flight"], health["breaker_state"]) == (3, "half-open")
    assert health["memory_bytes"] > 10_000_000  # this process's resident memory
