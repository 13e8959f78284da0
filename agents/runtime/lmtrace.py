"""A span per LM call, through DSPy's own callback mechanism.

:func:`track_usage` replaces ``dspy.track_usage()`` around a run. While tracing is
off it *is* ``dspy.track_usage()`` (no callback installed, nothing else done).
While tracing is on it also installs :class:`LMSpans`, a DSPy callback that opens a
``chat <model>`` CLIENT span when an LM call starts (``on_lm_start``, made current,
so it is a child of the worker's span) and ends it when the call ends, and a usage
tracker that records each call's tokens on that call's span
(``gen_ai.usage.input_tokens`` / ``output_tokens``): DSPy reports usage to the
tracker from inside the call, not to the callback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.usage_tracker import UsageTracker

from dspex.streams import tracing

_CURRENT: ContextVar[tracing.OpenSpan | None] = ContextVar("dspex_lm_span", default=None)


class LMSpans(BaseCallback):  # type: ignore[misc]
    """Opens a ``chat <model>`` span per LM call (DSPy's ``on_lm_start`` / ``on_lm_end``)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[tracing.OpenSpan, Any]] = {}

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        model = str(getattr(instance, "model", "unknown"))
        settings: Mapping[str, Any] = getattr(instance, "kwargs", None) or {}
        attributes = tracing.gen_ai_attributes(model, operation="chat")
        attributes |= {
            "gen_ai.request.temperature": _number(settings.get("temperature")),
            "gen_ai.request.max_tokens": _number(settings.get("max_tokens")),
        }
        opened = tracing.open_span(
            f"chat {model}", kind=tracing.SpanKind.CLIENT, attributes=attributes
        )
        if opened is not None:
            self._open[call_id] = (opened, _CURRENT.set(opened))

    def on_lm_end(
        self, call_id: str, outputs: Any | None, exception: BaseException | None = None
    ) -> None:
        found = self._open.pop(call_id, None)
        if found is None:
            return
        opened, token = found
        with contextlib.suppress(ValueError):  # ended in another context than it started
            _CURRENT.reset(token)
        opened.close(exception)


class _SpanUsage(UsageTracker):  # type: ignore[misc]
    """DSPy's usage tracker that also puts each call's tokens on the call's span."""

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        super().add_usage(lm, usage_entry)
        opened = _CURRENT.get()
        if opened is None:
            return
        tokens = tracing.gen_ai_attributes(
            lm,
            input_tokens=_count(usage_entry.get("prompt_tokens")),
            output_tokens=_count(usage_entry.get("completion_tokens")),
        )
        opened.span.set_attributes(tokens)


@contextlib.contextmanager
def track_usage() -> Iterator[UsageTracker]:
    """``dspy.track_usage()``, plus a span per LM call while tracing is on."""
    if not tracing.enabled():
        with dspy.track_usage() as tracker:
            yield tracker
        return
    tracker = _SpanUsage()
    parent = dspy.settings.usage_tracker
    callbacks = [*(dspy.settings.get("callbacks") or []), LMSpans()]
    with dspy.context(usage_tracker=tracker, callbacks=callbacks):
        try:
            yield tracker
        finally:  # as dspy.track_usage(): a nested tracker rolls up into its parent
            if parent is not None:
                for lm, entries in tracker.usage_data.items():
                    parent.usage_data[lm].extend(entries)


def execution_attributes(
    model: str, input_tokens: int, output_tokens: int, request: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``gen_ai.*`` attributes of a whole execution (the worker's span)."""
    return tracing.gen_ai_attributes(
        model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        **{"conversation.id": request.get("session_id")},
    )


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
