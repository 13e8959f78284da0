"""Running one request's program: the :class:`Executor` seam, DSPy behind it, failure classes.

The worker knows only :class:`Executor`; tests give it a fake, production gives
it :class:`DSPyExecutor` (programs built from the request's data, LMs from the
settings, LM faults handled by :class:`~dspex.agents.worker.faults.FaultPolicy`: retries,
per-backend circuit breakers, fallback variants). :func:`classify` decides what
a failure that got past all of that means for the client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from dspex.agents.plumbing.deadlines import remaining_seconds
from dspex.agents.plumbing.messages import ErrorInfo, TokenUsage
from dspex.agents.worker.faults import (
    BackendsExhausted,
    BreakerBoard,
    FaultPolicy,
    RetryPolicy,
    is_retryable,
)
from dspex.streams import tracing
from dspex.streams.errors import InvalidRequest
from dspex.streams.settings import LMBackend, ReliabilitySettings, Settings

if TYPE_CHECKING:
    from dspex.agents.runtime.modules import DeployedModules
    from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec
    from dspex.agents.runtime.tools import ToolRegistry

logger = logging.getLogger(__name__)

ChunkCallback = Callable[[str], Awaitable[None]]
"""Called with each piece of streamed text while a program runs."""


@dataclass(frozen=True)
class Outcome:
    """A successful execution: output values by field, tokens, the per-predictor trace."""

    outputs: dict[str, Any]
    usage: TokenUsage = field(default_factory=TokenUsage)
    trace: list[dict[str, Any]] = field(default_factory=list)
    program_version: int | None = None
    variant: str | None = None
    """The LM backend variant that answered (a fallback may differ from the route's)."""
    breaker_state: str | None = None
    """That variant's circuit breaker state afterwards; None when no breaker is used."""
    failed_variants: tuple[tuple[str, str], ...] = ()
    """(variant, error class) of the backends that gave up before it answered."""


class Executor(Protocol):
    """Runs one decoded Request; raises a DSPex error (or TimeoutError) when it cannot."""

    async def execute(
        self, request: Mapping[str, Any], on_chunk: ChunkCallback | None
    ) -> Outcome: ...


@dataclass(frozen=True)
class ExecutionFailure:
    """What a failed execution means: the final status, the error, whether to dead-letter."""

    status: str  # "error" | "timeout"
    error: ErrorInfo
    dead_letter: bool
    breaker_state: str | None = None
    failed_variants: tuple[tuple[str, str], ...] = ()


def classify(exc: BaseException, *, stage: str = "execute") -> ExecutionFailure:
    """Map an execution failure to the client-visible status and error.

    Timeouts are final ``"timeout"`` answers (the deadline is gone, nothing to
    dead-letter). Retryable failures (DSPex's :class:`RetryableError`, DSPy's
    transient LM errors) are answered as errors with ``retryable=true`` and
    dead-lettered; everything else is a permanent error.
    """
    name = type(exc).__name__
    if isinstance(exc, TimeoutError):
        message = str(exc) or "deadline exceeded while running the program"
        return ExecutionFailure("timeout", ErrorInfo(name, message, None, stage, False), False)
    field_name = exc.field if isinstance(exc, InvalidRequest) else None
    retryable = is_retryable(exc)
    error = ErrorInfo(name, str(exc) or name, field_name, stage, retryable)
    if isinstance(exc, BackendsExhausted):
        failed = tuple((f.variant, f.error_class) for f in exc.failures)
        return ExecutionFailure("error", error, True, exc.breaker_state, failed)
    return ExecutionFailure("error", error, True)


_LM_VARIABLES = {"temperature": float, "max_tokens": int}


def backend_overrides(variables: Mapping[str, str]) -> dict[str, Any]:
    """LM settings a request's variables override (JSON values), e.g. ``temperature``."""
    overrides: dict[str, Any] = {}
    for name, kind in _LM_VARIABLES.items():
        if name not in variables:
            continue
        try:
            overrides[name] = kind(json.loads(variables[name]))
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidRequest(f"variables.{name}", f"not a JSON {kind.__name__}") from exc
    _check_ranges(overrides)
    return overrides


def _check_ranges(overrides: Mapping[str, Any]) -> None:
    """The overrides within the bounds settings allow (NaN, infinity and 1e999 are not)."""
    try:
        LMBackend.model_validate({"model": "-", **overrides})
    except ValidationError as exc:
        where = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise InvalidRequest(f"variables.{where}", exc.errors()[0]["msg"]) from exc


class DSPyExecutor:
    """Runs the request's program with DSPy: built from data, LM per variant built once.

    The router embeds the resolved program in the pool record (signature,
    module type, state, config, tools, version), so nothing is looked up here.
    LM calls go through ``faults`` (default: from ``settings.reliability``); ``lms``
    pre-builds LMs by variant name (tests use it to plug in simulations).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        faults: FaultPolicy | None = None,
        lms: Mapping[str, Any] | None = None,
    ) -> None:
        from dspex.agents.runtime.modules import DeployedModules
        from dspex.agents.runtime.programs import ProgramBuilder
        from dspex.agents.runtime.tools import deployed_tools

        self._settings = settings
        # the operator's allowlisted tools and modules, imported now: a bad path fails the start
        self._tools: ToolRegistry = deployed_tools(settings.tools)
        self._modules: DeployedModules = DeployedModules.load(settings.modules)
        self._builder: ProgramBuilder = ProgramBuilder(self._tools, modules=self._modules)
        self._lms: dict[str, Any] = dict(lms or {})
        self.faults = faults or fault_policy(settings.reliability)

    async def execute(self, request: Mapping[str, Any], on_chunk: ChunkCallback | None) -> Outcome:
        """Validate inputs, build the module, run it on the first backend that answers."""
        from dspex.agents.runtime.adapters import adapter_name, make_adapter
        from dspex.agents.runtime.programs import RunResult, parse_signature, run, validate

        spec = _spec(request)
        inputs = validate(spec, request["inputs"], tools=self._tools, modules=self._modules)
        module = self._builder.build(spec)
        overrides = backend_overrides(request.get("variables") or {})
        adapter = adapter_name(spec.adapter, request.get("variables") or {})
        gate = _ChunkGate(on_chunk)

        async def attempt(variant: str) -> RunResult:
            lm = self._lm_for(variant, overrides)
            timeout = remaining_seconds(request)
            chosen = make_adapter(adapter, lm, parse_signature(spec.signature))
            return await run(
                module, inputs, lm=lm, timeout_s=timeout, on_chunk=gate.callback, adapter=chosen
            )

        answered = await self.faults.run(
            self.variants(request),
            attempt,
            time_left_s=remaining_seconds(request),
            replayable=gate.replayable,
            request_id=request.get("request_id"),
        )
        result = answered.value
        usage = result.usage
        self._annotate(request, answered.variant, usage)
        version = request.get("program_version")
        trace = list(result.trace)
        failed = tuple((f.variant, f.error_class) for f in answered.failures)
        return Outcome(
            dict(result.outputs),
            usage,
            trace,
            version,
            answered.variant,
            answered.breaker_state,
            failed,
        )

    def variants(self, request: Mapping[str, Any]) -> list[str]:
        """Backends to try in order: the route's, its configured fallbacks, the pool's default."""
        route = request.get("route") or {}
        backends = self._settings.lm.backends
        default = self._settings.lm.variant_for_pool(route.get("pool") or "general")
        first = route.get("variant")
        chosen = [str(first)] if first in backends else []
        if chosen:
            chosen += self._settings.reliability.fallbacks.get(chosen[0], [])
        chosen.append(default)
        ordered = [v for v in dict.fromkeys(chosen) if v in backends]
        if not ordered:
            raise InvalidRequest("route.variant", f"no LM backend named {default!r}")
        return ordered

    def _annotate(self, request: Mapping[str, Any], variant: str, usage: TokenUsage) -> None:
        """The worker's span gets the ``gen_ai.*`` attributes of the model that answered."""
        if tracing.enabled():
            from dspex.agents.runtime.lmtrace import execution_attributes

            model = self._settings.lm.backends[variant].model
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            tracing.annotate(execution_attributes(model, prompt, completion, request))

    def _lm_for(self, variant: str, overrides: Mapping[str, Any]) -> Any:
        backend = self._settings.lm.backends[variant]
        if overrides:  # a per-request copy only when the request changes the LM's settings
            return self._build(backend.model_copy(update=dict(overrides)))
        if variant not in self._lms:
            self._lms[variant] = self._build(backend)
        return self._lms[variant]

    @staticmethod
    def _build(backend: LMBackend) -> Any:
        from dspex.agents.runtime.lms import build_lm

        return build_lm(backend)


def fault_policy(reliability: ReliabilitySettings) -> FaultPolicy:
    """The worker's LM fault policy as configured in ``settings.reliability``."""
    retry = RetryPolicy(
        reliability.retry_attempts, reliability.retry_base_s, reliability.retry_max_s
    )
    breakers = BreakerBoard(reliability.breaker_fail_max, reliability.breaker_reset_timeout_s)
    return FaultPolicy(retry, breakers)


class _ChunkGate:
    """Passes streamed chunks on and remembers whether any reached the client."""

    def __init__(self, on_chunk: ChunkCallback | None) -> None:
        self._on_chunk = on_chunk
        self.sent = False
        self.callback = self._send if on_chunk is not None else None

    async def _send(self, delta: str) -> None:
        assert self._on_chunk is not None  # noqa: S101 - callback is None otherwise
        self.sent = True
        await self._on_chunk(delta)

    def replayable(self) -> bool:
        """A request whose output was partly streamed must not be run again."""
        return not self.sent


def _spec(request: Mapping[str, Any]) -> ProgramSpec:
    """The program the router embedded in the pool record.

    A registered program arrives resolved (signature, state, version set), so the
    record itself is its registered version.
    """
    from dspex.agents.runtime.programs import spec_from_request, spec_from_version

    registered = None
    if request.get("program_id") is not None and request.get("signature"):
        registered = spec_from_version({**request, "version": request.get("program_version")})
    return spec_from_request(request, registered)
