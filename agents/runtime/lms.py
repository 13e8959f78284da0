"""LM backends for programs: :func:`build_lm` and :class:`EchoLM`, DSPex's deterministic simulation.

``EchoLM`` is a ``dspy.LM`` driven by a custom DSPy *engine* (DSPy 3.4's supported way
to plug in a model: ``complete(Request) -> Response`` plus ``stream(Request)``), so it
goes through DSPy's real execution path, adapters, usage accounting and token streaming.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dspy
from dspy.lm15 import (
    Message,
    Request,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
)

from dspex.streams.settings import LMBackend

ECHO_MODEL = "dspex/echo"
LLAMA_CPP_MODEL = "dspex/llama-cpp"
SIM_PREFIX = "dspex/sim"  # dspex.agents.runtime.simulations: deterministic toy-task simulations

_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.MULTILINE)
_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'")
_TOKEN = re.compile(r"\s*\S+")


def build_lm(backend: LMBackend, *, cache: bool = False) -> dspy.BaseLM:
    """The DSPy LM for one configured backend (credentials come from settings only)."""
    if backend.model == ECHO_MODEL:
        return EchoLM(cache=cache)
    if backend.model == LLAMA_CPP_MODEL:
        from dspex.agents.runtime.local_model import (
            LlamaCppLM,  # loads llama.cpp only where it is used
        )

        return LlamaCppLM(backend, cache=cache)
    if backend.model.startswith(SIM_PREFIX):  # dspex/sim?...: labelled simulations (tests, demos)
        from dspex.agents.runtime.simulations import SimulatedLM

        return SimulatedLM(
            backend.model,
            temperature=backend.temperature,
            max_tokens=backend.max_tokens,
            cache=cache,
        )
    api_key = backend.api_key.get_secret_value() if backend.api_key else None
    return dspy.LM(
        backend.model,
        api_base=backend.api_base,
        api_key=api_key,
        temperature=backend.temperature,
        max_tokens=backend.max_tokens,
        cache=cache,
        # DSPex's FaultPolicy retries with backoff within the deadline, per backend with
        # a breaker: LiteLLM's own retries (3, sleeping 1-4 s) would hide under it
        num_retries=0,
    )


class InlineLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` on a pure-CPU engine that answers inline when it cannot block.

    DSPy's ``acall`` hops to a worker thread twice per call (request preparation and
    pricing), which costs more than a simulated answer and contends for the GIL in a
    busy worker. While :attr:`dspex_inline` holds (no simulated latency, no retry
    sleeps, no DSPy response cache, which may read disk), ``acall`` makes DSPy's
    synchronous call on the caller's thread instead: same adapters, usage and errors,
    and the program keeps its own async path (``aforward``, e.g. DSPex's BestOfN, whose
    sync ``forward`` differs), so :func:`dspex.agents.runtime.runner.run` needs no path of its own.
    Streaming (``dspy.streamify``) keeps DSPy's async call, which feeds the stream.

    ``acall`` yields to the event loop once first, where DSPy's async call would first
    wait: a deadline (``asyncio.timeout``) or cancellation fires there, between LM calls,
    but never interrupts one. That is acceptable only because an inline call never blocks.
    """

    latency_s: float | None = None
    """Simulated latency per call (0: none), set by the constructor that builds the
    matching sync and async engines; None (a subclass with engines of its own, which
    may differ): never inline."""

    @property
    def dspex_inline(self) -> bool:
        """Whether a call never blocks, so ``acall`` may run it on the caller's thread."""
        return self.latency_s == 0 and not self.num_retries and not self.cache

    async def acall(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any:
        if not self.dspex_inline or dspy.settings.send_stream is not None:
            return await super().acall(prompt, messages=messages, **kwargs)
        await asyncio.sleep(0)
        return self(prompt, messages=messages, **kwargs)


class EchoLM(InlineLM):
    """A deterministic SIMULATION of an LM, for tests, benchmarks and the demo.

    It reads the input fields from the prompt DSPy's ChatAdapter built and answers every
    requested output field with a value derived from the first input: ``str`` fields
    ``"echo: <first input>"``, ``float`` 0.5, ``int`` the first input's length, ``bool``
    True, lists ``[<first input>]``, ``reasoning`` "echoing", ``Literal`` choices
    ``finish`` when offered (so ReAct finishes at once), dicts ``{}``. Usage counts are
    whitespace word counts. ``latency_s`` simulates model latency (awaited, not slept).
    """

    def __init__(self, *, cache: bool = False, latency_s: float = 0.0) -> None:
        engine = EchoEngine()
        super().__init__(
            ECHO_MODEL,
            cache=cache,
            num_retries=0,
            temperature=0.0,
            max_tokens=512,
            engine=engine,
            async_engine=AsyncEchoEngine(engine, latency_s=latency_s),
        )
        self.latency_s = latency_s


class EchoEngine:
    """Synchronous DSPy engine behind :class:`EchoLM` (stateless, thread-safe)."""

    def complete(self, request: Request) -> Response:
        text = echo_reply(system_text(request), last_user_text(request))
        return Response(
            id=None,
            model=ECHO_MODEL,
            message=Message.assistant((TextPart(text),)),
            finish_reason="stop",
            usage=_usage(request, text),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        response = self.complete(request)
        yield StreamStartEvent(model=ECHO_MODEL)
        for token in _TOKEN.findall(response.text or ""):
            yield StreamDeltaEvent(delta=TextDelta(text=token))
        yield StreamEndEvent(finish_reason="stop", usage=response.usage)

    def close(self) -> None:
        return None

    def dump_state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> EchoEngine:
        return cls()


class AsyncEchoEngine:
    """Async counterpart of :class:`EchoEngine`; ``latency_s`` is awaited per call."""

    def __init__(self, sync: EchoEngine, *, latency_s: float = 0.0) -> None:
        self.sync = sync
        self.latency_s = latency_s

    async def complete(self, request: Request) -> Response:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return self.sync.complete(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in self.sync.stream(request):
            if self.latency_s and event.type == "delta":
                await asyncio.sleep(self.latency_s / 10)
            yield event

    async def aclose(self) -> None:
        return None


def echo_reply(system: str, user: str) -> str:
    """The ChatAdapter-formatted answer EchoLM gives for one prompt."""
    inputs = prompt_inputs(user)
    first = next(iter(inputs.values()), "")
    blocks = [
        f"[[ ## {name} ## ]]\n{_value_for(name, type_text, first)}"
        for name, type_text in prompt_output_fields(system)
    ]
    return "\n\n".join([*blocks, "[[ ## completed ## ]]"])


def system_text(request: Request) -> str:
    system = request.system
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(getattr(part, "text", "") or "" for part in system)


def last_user_text(request: Request) -> str:
    users = [m for m in request.messages if m.role == "user"]
    return (users[-1].text or "") if users else ""


def prompt_inputs(user: str) -> dict[str, str]:
    """``[[ ## name ## ]]`` blocks of the last user message, in order."""
    # The adapter's closing instruction names the output headers too: cut it off first.
    parts = _HEADER.split(_strip_trailer(user))
    values = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        values[name] = body.strip()
    return values


def _strip_trailer(body: str) -> str:
    # The last block is followed by the adapter's "Respond with ..." instruction.
    head, _, _ = body.partition("\n\nRespond with the corresponding output fields")
    return head


def prompt_output_fields(system: str) -> list[tuple[str, str]]:
    _, _, section = system.partition("Your output fields are:")
    section, _, _ = section.partition("All interactions will be structured")
    return _FIELD_LINE.findall(section)


def _value_for(name: str, type_text: str, first: str) -> str:
    if name == "reasoning":
        return "echoing"
    simple = {"str": f"echo: {first}", "float": "0.5", "int": str(len(first)), "bool": "True"}
    if type_text in simple:
        return simple[type_text]
    if type_text.startswith("Literal["):
        options = _LITERAL.findall(type_text)
        return "finish" if "finish" in options else (options[0] if options else "")
    if type_text.startswith("list["):
        return _json_list(first)
    if type_text.startswith("dict["):
        return "{}"
    return f"echo: {first}"


def _json_list(value: str) -> str:
    import json

    return json.dumps([value])


def _words(text: str) -> int:
    return len(text.split())


def _usage(request: Request, reply: str) -> Usage:
    prompt = _words(system_text(request)) + sum(_words(m.text or "") for m in request.messages)
    completion = _words(reply)
    return Usage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)
