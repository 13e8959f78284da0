"""``dspex/sim``: deterministic SIMULATED LMs for optimizer tests and demos (no real model).

Like :class:`~dspex.agents.runtime.lms.EchoLM` they are ``dspy.LM`` objects driven by a custom
DSPy engine, so DSPy's adapters, demos, optimizers and streaming run for real;
only the "model" is a few lines of Python. A simulation knows one toy *task*
(a function of the first input) and answers every ``str`` output field with it —
unless its configuration says it cannot:

* ``needs=demos``: it answers right only when the prompt carries demonstrations
  (few-shot examples, which DSPy renders as earlier user/assistant turns), so
  BootstrapFewShot's demos take a metric from 0 to 1;
* ``max_temperature=X``: it answers right only at temperature <= X, so a search
  over ``temperature`` has one clearly better region;
* ``delay=S``: every call takes S seconds (long-job tests);
* it answers in the format the program's adapter asks for (Chat, JSON, XML,
  TwoStep; :mod:`~dspex.agents.runtime.lms.formats`), and declares structured-output
  support, so JSONAdapter sends it a ``response_format`` as it would to a real model;
* ``fail=N``: the first N calls *in the process* (counted per option set, over
  every copy of the LM) raise a SIMULATED provider outage — ``dspy.lm15``'s
  ``ServerError`` (HTTP 503), which DSPy maps to its retryable
  ``LMServerError`` — and later calls answer normally (retry-topic tests;
  a huge N fails every call).

``task=recall`` is a SIMULATION of a model that remembers the conversation:
its ``str`` answer is the first input of every earlier user turn in the prompt
(DSPy renders a ``History`` input's messages as earlier user/assistant turns),
then this turn's, joined by :data:`RECALL_SEPARATOR` — so a test sees exactly
which history a program was given (sessions tests).

A wrong answer is :data:`WRONG`. Options travel in the model string, e.g.
``dspex/sim?task=reverse&needs=demos&delay=0.5``; two backends with different
tasks make a search over ``model`` (backend names) pick the one that is right.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from dspy.lm15 import (
    Message,
    Request,
    Response,
    ServerError,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
)

from dspex.agents.runtime.lms.base import (
    AsyncEngine,
    InlineLM,
    StatelessEngine,
    last_user_text,
    prompt_inputs,
    system_text,
)
from dspex.agents.runtime.lms.formats import CHAT, EXTRACT, read_prompt, render
from dspex.streams.errors import ConfigError

SIM_MODEL = "dspex/sim"
WRONG = "I do not know"
RECALL = "recall"
RECALL_SEPARATOR = " | "

TASKS: dict[str, Callable[[str], str]] = {
    "reverse": lambda text: text[::-1],
    "upper": str.upper,
    "lower": str.lower,
    "echo": lambda text: text,
    RECALL: lambda text: text,  # the whole conversation: see recalled()
}


@dataclass(frozen=True)
class SimOptions:
    """What one simulated model knows and when it answers right."""

    task: str = "reverse"
    needs_demos: bool = False
    max_temperature: float | None = None
    delay_s: float = 0.0
    fail: int = 0

    @classmethod
    def parse(cls, model: str) -> SimOptions:
        """Options from ``dspex/sim?task=...&needs=demos&max_temperature=...&delay=...&fail=N``."""
        base, _, query = model.partition("?")
        if base != SIM_MODEL:
            raise ConfigError(f"model {model!r} is not a {SIM_MODEL} simulation")
        options = dict(parse_qsl(query, strict_parsing=bool(query)))
        unknown = sorted(set(options) - {"task", "needs", "max_temperature", "delay", "fail"})
        if unknown:
            raise ConfigError(f"model {model!r}: unknown option {unknown[0]!r}")
        task = options.get("task", "reverse")
        if task not in TASKS:
            raise ConfigError(f"model {model!r}: unknown task {task!r} ({', '.join(TASKS)})")
        if options.get("needs", "demos") != "demos":
            raise ConfigError(f"model {model!r}: needs must be 'demos'")
        try:
            ceiling = options.get("max_temperature")
            return cls(
                task=task,
                needs_demos="needs" in options,
                max_temperature=None if ceiling is None else float(ceiling),
                delay_s=float(options.get("delay", 0.0)),
                fail=_count(options.get("fail", "0")),
            )
        except ValueError as exc:
            raise ConfigError(f"model {model!r}: {exc}") from exc


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"fail must be >= 0, got {value}")
    return value


class _Outages:
    """Calls so far per simulation in this process, for ``fail=N`` (a SIMULATED outage).

    Process-wide on purpose: a worker builds a fresh LM per request that
    overrides temperature or max_tokens, and "the first N calls" must still mean N.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the sync engine may run in DSPy's threads
        self._calls: dict[SimOptions, int] = {}

    def check(self, options: SimOptions) -> None:
        """Raise the simulated provider error while this is one of the first ``fail`` calls."""
        if not options.fail:
            return
        with self._lock:
            call = self._calls.get(options, 0) + 1
            self._calls[options] = call
        if call <= options.fail:
            raise ServerError(
                f"SIMULATED outage of {SIM_MODEL}: call {call}, the first {options.fail} fail",
                status=503,
                provider="dspex-sim",
            )


_OUTAGES = _Outages()


def is_simulation(model: str) -> bool:
    """Whether a backend's model string names a ``dspex/sim`` simulation."""
    return model == SIM_MODEL or model.startswith(SIM_MODEL + "?")


class SimulatedLM(InlineLM):
    """A deterministic SIMULATION of an LM that knows one toy task (see the module doc).

    Without ``delay`` it answers inline (see ``lms.InlineLM``); a simulated
    outage only raises.
    """

    def __init__(
        self, model: str, *, temperature: float = 0.0, max_tokens: int = 512, cache: bool = False
    ) -> None:
        options = SimOptions.parse(model)
        engine = SimEngine(options)
        super().__init__(
            SIM_MODEL,
            cache=cache,
            num_retries=0,
            temperature=temperature,
            max_tokens=max_tokens,
            engine=engine,
            async_engine=AsyncSimEngine(engine),
        )
        self.latency_s = options.delay_s


class SimEngine(StatelessEngine):
    """Synchronous DSPy engine behind :class:`SimulatedLM` (stateless, thread-safe)."""

    # DSPy reads these off a custom engine: JSONAdapter then asks for structured output
    # (``response_format``), and ``auto`` picks JSON for typed outputs (runtime.adapters).
    supports_response_schema = True
    supported_params = frozenset({"response_format"})

    def __init__(self, options: SimOptions) -> None:
        self.options = options

    def complete(self, request: Request) -> Response:
        if self.options.delay_s:
            time.sleep(self.options.delay_s)
        _OUTAGES.check(self.options)
        return self.answer(request)

    def answer(self, request: Request) -> Response:
        """The reply to ``request``, without the simulated delay."""
        text = sim_reply(self.options, request)
        words = len(text.split())
        prompt = len(system_text(request).split()) + sum(
            len((m.text or "").split()) for m in request.messages
        )
        return Response(
            id=None,
            model=SIM_MODEL,
            message=Message.assistant((TextPart(text),)),
            finish_reason="stop",
            usage=Usage(input_tokens=prompt, output_tokens=words, total_tokens=prompt + words),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        response = self.complete(request)
        yield from _events(response)


class AsyncSimEngine(AsyncEngine[SimEngine]):
    """Async counterpart of :class:`SimEngine`: the delay is awaited, not slept."""

    async def complete(self, request: Request) -> Response:
        if self.sync.options.delay_s:
            await asyncio.sleep(self.sync.options.delay_s)
        _OUTAGES.check(self.sync.options)
        return self.sync.answer(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in _events(await self.complete(request)):
            yield event


def _events(response: Response) -> Iterator[Any]:
    yield StreamStartEvent(model=SIM_MODEL)
    for word in (response.text or "").split(" "):
        yield StreamDeltaEvent(delta=TextDelta(text=word + " "))
    yield StreamEndEvent(finish_reason="stop", usage=response.usage)


def knows_the_task(options: SimOptions, request: Request) -> bool:
    """Whether this call is answered right: demos present when needed, temperature low enough."""
    if options.needs_demos and not any(m.role == "assistant" for m in request.messages):
        return False
    temperature = request.config.temperature or 0.0
    return options.max_temperature is None or temperature <= options.max_temperature


def sim_reply(options: SimOptions, request: Request) -> str:
    """The answer for one prompt, in the format its adapter asks for (``lms.formats``)."""
    prompt = read_prompt(system_text(request), last_user_text(request))
    if prompt.format == EXTRACT:  # TwoStepAdapter's extraction: copy the first reply's values
        fields = [(n, t, prompt.inputs.get(n, "")) for n, t in prompt.outputs]
        return render(CHAT, fields)
    first = next(iter(prompt.inputs.values()), "")
    right = knows_the_task(options, request)
    values = []
    for name, type_text in prompt.outputs:
        if name == "reasoning":
            value = "simulated reasoning"
        elif type_text == "str" and not right:
            value = WRONG
        elif type_text == "str":
            value = recalled(request) if options.task == RECALL else TASKS[options.task](first)
        else:
            value = _typed(type_text, first)
        values.append((name, type_text, value))
    return render(prompt.format, values)


def recalled(request: Request) -> str:
    """SIMULATED memory: the first input of each user turn in the prompt, oldest first."""
    firsts = []
    for message in request.messages:
        if message.role == "user":
            inputs = prompt_inputs(message.text or "")
            firsts.append(next(iter(inputs.values()), ""))
    return RECALL_SEPARATOR.join(firsts)


def _typed(type_text: str, first: str) -> str:
    simple = {"float": "0.5", "int": str(len(first)), "bool": "True"}
    if type_text in simple:
        return simple[type_text]
    if type_text.startswith("list["):
        return json.dumps([first])
    return "{}" if type_text.startswith("dict[") else first
