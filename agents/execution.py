"""Running one request's program: the :class:`Executor` seam, DSPy behind it, failure classes.

The worker knows only :class:`Executor`; tests give it a fake, production gives
it :class:`DSPyExecutor` (programs built from the request's data, LMs from the
settings). :func:`classify` decides what a failure means for the client — the
one place a later retry/circuit-breaker policy hooks in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from agents.records import ErrorInfo
from streams.errors import InvalidRequest, PermanentError, RetryableError
from streams.settings import LMBackend, Settings

if TYPE_CHECKING:
    from agents.programs import ProgramBuilder, ProgramSpec
    from agents.tools import ToolRegistry

logger = logging.getLogger(__name__)

ChunkCallback = Callable[[str], Awaitable[None]]
"""Called with each piece of streamed text while a program runs."""


class TokenUsage(NamedTuple):
    """LM tokens one execution used."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class Outcome:
    """A successful execution: output values by field, tokens, the per-predictor trace."""

    outputs: dict[str, Any]
    usage: TokenUsage = field(default_factory=TokenUsage)
    trace: list[dict[str, Any]] = field(default_factory=list)
    program_version: int | None = None


class Executor(Protocol):
    """Runs one decoded Request; raises a DSPex error (or TimeoutError) when it cannot."""

    async def execute(
        self, request: Mapping[str, Any], on_chunk: ChunkCallback | None
    ) -> Outcome: ...


@dataclass(frozen=True)
class Failure:
    """What a failed execution means: the final status, the error, whether to dead-letter."""

    status: str  # "error" | "timeout"
    error: ErrorInfo
    dead_letter: bool


def classify(exc: BaseException, *, stage: str = "execute") -> Failure:
    """Map an execution failure to the client-visible status and error.

    Timeouts are final ``"timeout"`` answers (the deadline is gone, nothing to
    dead-letter). Retryable failures (DSPex's :class:`RetryableError`, DSPy's
    transient LM errors) are answered as errors with ``retryable=true`` and
    dead-lettered; everything else is a permanent error.
    """
    name = type(exc).__name__
    if isinstance(exc, TimeoutError):
        message = str(exc) or "deadline exceeded while running the program"
        return Failure("timeout", ErrorInfo(name, message, None, stage, False), False)
    field_name = exc.field if isinstance(exc, InvalidRequest) else None
    retryable = is_retryable(exc)
    error = ErrorInfo(name, str(exc) or name, field_name, stage, retryable)
    return Failure("error", error, True)


def is_retryable(exc: BaseException) -> bool:
    """Whether the same request may succeed if run again later."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, PermanentError) or not isinstance(exc, Exception):
        return False
    if type(exc).__module__.startswith("dspy"):
        from dspy.utils.exceptions import is_retryable_lm_error

        return bool(is_retryable_lm_error(exc))
    return False


def remaining_seconds(request: Mapping[str, Any], at: datetime | None = None) -> float | None:
    """Seconds left before the request's deadline (negative when passed); None without one."""
    deadline: datetime | None = request.get("deadline_at")
    if deadline is None:
        return None
    return (deadline - (at or datetime.now(UTC))).total_seconds()


_LM_VARIABLES = {"temperature": float, "max_tokens": int}


def backend_overrides(variables: Mapping[str, str]) -> dict[str, Any]:
    """LM settings a request's variables override (JSON values), e.g. ``temperature``."""
    overrides: dict[str, Any] = {}
    for name, kind in _LM_VARIABLES.items():
        if name not in variables:
            continue
        try:
            overrides[name] = kind(json.loads(variables[name]))
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"variables.{name}", f"not a JSON {kind.__name__}") from exc
    return overrides


class DSPyExecutor:
    """Runs the request's program with DSPy: built from data, LM per variant built once.

    The router embeds the resolved program in the pool record (signature,
    module type, state, config, tools, version), so nothing is looked up here.
    """

    def __init__(self, settings: Settings) -> None:
        from agents.programs import ProgramBuilder
        from agents.tools import default_tools

        self._settings = settings
        self._tools: ToolRegistry = default_tools()
        self._builder: ProgramBuilder = ProgramBuilder(self._tools)
        self._lms: dict[str, Any] = {}

    async def execute(self, request: Mapping[str, Any], on_chunk: ChunkCallback | None) -> Outcome:
        """Validate inputs, build the module, run it within the request's deadline."""
        from agents.programs import run, validate

        spec = _spec(request)
        inputs = validate(spec, request["inputs"], tools=self._tools)
        module = self._builder.build(spec)
        lm = self._lm_for(request)
        timeout = remaining_seconds(request)
        result = await run(module, inputs, lm=lm, timeout_s=timeout, on_chunk=on_chunk)
        usage = TokenUsage(
            result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens
        )
        version = request.get("program_version")
        return Outcome(dict(result.outputs), usage, list(result.trace), version)

    def _lm_for(self, request: Mapping[str, Any]) -> Any:
        variant = self._variant(request)
        backend = self._settings.lm.backends[variant]
        overrides = backend_overrides(request.get("variables") or {})
        if overrides:  # a per-request copy only when the request changes the LM's settings
            return self._build(backend.model_copy(update=overrides))
        if variant not in self._lms:
            self._lms[variant] = self._build(backend)
        return self._lms[variant]

    def _variant(self, request: Mapping[str, Any]) -> str:
        """The route's variant when it names a backend, else the pool's default variant."""
        route = request.get("route") or {}
        lm = self._settings.lm
        variant = route.get("variant")
        if variant in lm.backends:
            return str(variant)
        fallback = lm.variant_for_pool(route.get("pool") or "general")
        if fallback not in lm.backends:
            raise InvalidRequest("route.variant", f"no LM backend named {fallback!r}")
        return fallback

    @staticmethod
    def _build(backend: LMBackend) -> Any:
        from agents.lms import build_lm

        return build_lm(backend)


def _spec(request: Mapping[str, Any]) -> ProgramSpec:
    """The program the router embedded in the pool record.

    A registered program arrives resolved (signature, state, version set), so the
    record itself is its registered version.
    """
    from agents.programs import spec_from_request, spec_from_version

    registered = None
    if request.get("program_id") is not None and request.get("signature"):
        registered = spec_from_version({**request, "version": request.get("program_version")})
    return spec_from_request(request, registered)
