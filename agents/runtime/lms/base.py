"""What every DSPex LM shares: model names, :class:`InlineLM`, and ChatAdapter prompt parsing.

The implementations (``echo``, ``simulations``, ``local_model``) build on this
module; :func:`dspex.agents.runtime.lms.build_lm` picks one per configured backend.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Generic, TypeVar

import dspy
from dspy.lm15 import Request

ECHO_MODEL = "dspex/echo"
LLAMA_CPP_MODEL = "dspex/llama-cpp"
SIM_PREFIX = "dspex/sim"  # lms.simulations: deterministic toy-task simulations

_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.MULTILINE)


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


E = TypeVar("E", bound="StatelessEngine")


class StatelessEngine:
    """What a DSPy engine of DSPex's own must offer besides answering: no state, nothing to close.

    The sync engines subclass this; :class:`AsyncEngine` is the async counterpart.
    """

    def close(self) -> None:
        return None

    def dump_state(self) -> dict[str, Any]:
        return {}


class AsyncEngine(Generic[E]):
    """An async engine over a sync one (``self.sync``): holds nothing to close."""

    def __init__(self, sync: E) -> None:
        self.sync = sync

    async def aclose(self) -> None:
        return None


def words(text: str) -> int:
    """Whitespace word count: the simulations' token count."""
    return len(text.split())
