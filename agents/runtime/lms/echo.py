"""EchoLM: DSPex's deterministic SIMULATION of an LM (tests, benchmarks, the demo).

``EchoLM`` is a ``dspy.LM`` driven by a custom DSPy *engine* (DSPy 3.4's supported way
to plug in a model: ``complete(Request) -> Response`` plus ``stream(Request)``), so it
goes through DSPy's real execution path, adapters, usage accounting and token streaming.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

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

from dspex.agents.runtime.lms.base import (
    ECHO_MODEL,
    AsyncEngine,
    InlineLM,
    StatelessEngine,
    last_user_text,
    system_text,
    words,
)
from dspex.agents.runtime.lms.formats import CHAT, EXTRACT, read_prompt, render

_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'")
_TOKEN = re.compile(r"\s*\S+")


class EchoLM(InlineLM):
    """A deterministic SIMULATION of an LM, for tests, benchmarks and the demo.

    It reads the input fields from the prompt DSPy's adapter built (Chat, JSON, XML,
    TwoStep), answers in that adapter's format, and gives every requested output field
    a value derived from the first input: ``str`` fields
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


class EchoEngine(StatelessEngine):
    """Synchronous DSPy engine behind :class:`EchoLM` (stateless, thread-safe)."""

    # read by DSPy off a custom engine: JSONAdapter asks it for structured output
    supports_response_schema = True
    supported_params = frozenset({"response_format"})

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

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> EchoEngine:
        return cls()


class AsyncEchoEngine(AsyncEngine[EchoEngine]):
    """Async counterpart of :class:`EchoEngine`; ``latency_s`` is awaited per call."""

    def __init__(self, sync: EchoEngine, *, latency_s: float = 0.0) -> None:
        super().__init__(sync)
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


def echo_reply(system: str, user: str) -> str:
    """EchoLM's answer to one prompt, in the format its adapter asks for (``lms.formats``)."""
    prompt = read_prompt(system, user)
    if prompt.format == EXTRACT:  # TwoStepAdapter's extraction: copy the first reply's values
        return render(CHAT, [(n, t, prompt.inputs.get(n, "")) for n, t in prompt.outputs])
    first = next(iter(prompt.inputs.values()), "")
    fields = [(n, t, _value_for(n, t, first)) for n, t in prompt.outputs]
    return render(prompt.format, fields)


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
    return json.dumps([value])


def _usage(request: Request, reply: str) -> Usage:
    prompt = words(system_text(request)) + sum(words(m.text or "") for m in request.messages)
    completion = words(reply)
    return Usage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)
