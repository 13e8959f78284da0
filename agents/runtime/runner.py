"""Run a built program once: LM from ``dspy.context``, deadline, token streaming, usage, trace.

Streaming uses DSPy's own path: ``dspy.streamify`` with a ``StreamListener`` on the last
``str`` output field. The LM's engine streams events, DSPy turns them into chunks on
``settings.send_stream``, and the listener cuts the field's text out of the
ChatAdapter markup; each piece goes to ``on_chunk``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.streaming import StreamListener, StreamResponse

from dspex.agents.plumbing.messages import TokenUsage
from dspex.agents.runtime import lmtrace
from dspex.streams.errors import DSPexError, ProgramError

OnChunk = Callable[[str], Awaitable[None]]
_HIDDEN_OUTPUTS = frozenset({"trajectory"})
# DSPy streams no TwoStep reply, and a JSON one as raw JSON text (quotes, escapes, the
# next key): under these adapters the answer is sent whole once it is parsed
_UNSTREAMABLE = (dspy.TwoStepAdapter, dspy.JSONAdapter)


@dataclass(frozen=True)
class RunResult:
    """What one run produced: JSON-encodable outputs, usage and a JSON-encodable trace."""

    outputs: dict[str, Any]
    usage: TokenUsage
    trace: list[dict[str, Any]]


async def run(
    module: dspy.Module,
    inputs: Mapping[str, Any],
    *,
    lm: dspy.BaseLM,
    timeout_s: float | None = None,
    on_chunk: OnChunk | None = None,
    adapter: dspy.Adapter | None = None,
) -> RunResult:
    """Run ``module`` on ``inputs`` with ``lm`` (and ``adapter``: None is DSPy's ChatAdapter).

    Raises the builtin ``TimeoutError`` past ``timeout_s``, DSPy's ``LMError`` subclasses
    as they are (the worker classifies them) and ``ProgramError`` for anything else that
    goes wrong inside the program (unparseable LM output, a failing tool, ...).
    """
    # No DSPy history in a worker: it grows per module/LM (up to 10,000 entries each) and
    # makes every named_parameters() walk slower; the Execution record is the audit log.
    context = dspy.context(lm=lm, adapter=adapter, trace=[], disable_history=True)
    with context, lmtrace.track_usage() as tracker:
        try:
            async with asyncio.timeout(timeout_s):
                prediction = await _execute(module, dict(inputs), on_chunk)
        except (TimeoutError, dspy.LMError, DSPexError):
            raise
        except Exception as exc:
            raise ProgramError(
                f"{type(module).__name__} failed: {type(exc).__name__}: {exc}"
            ) from exc
        trace = list(dspy.settings.trace or [])
    return RunResult(
        outputs=_outputs(prediction),
        usage=_usage(tracker.get_total_tokens()),
        trace=_trace(module, trace),
    )


async def _execute(module: dspy.Module, inputs: dict[str, Any], on_chunk: OnChunk | None) -> Any:
    if on_chunk is not None:
        field = _stream_field(module)
        if field is not None and isinstance(dspy.settings.adapter, _UNSTREAMABLE):
            prediction = await _call(module, inputs)
            if isinstance(prediction.get(field), str) and prediction.get(field):
                await on_chunk(prediction[field])
            return prediction
        if field is not None:
            return await _stream(module, inputs, field, on_chunk)
    prediction = await _call(module, inputs)
    if on_chunk is not None:
        await _send_whole(prediction, on_chunk)
    return prediction


async def _call(module: dspy.Module, inputs: dict[str, Any]) -> Any:
    if _is_async(module):
        return await module.acall(**inputs)
    return await dspy.asyncify(module)(**inputs)


async def _send_whole(prediction: Any, on_chunk: OnChunk) -> None:
    """No text output to stream: send the last output whole, as its JSON (as in the outputs)."""
    if not isinstance(prediction, dspy.Prediction):
        return
    names = [k for k in prediction.keys() if k not in _HIDDEN_OUTPUTS and k != "reasoning"]
    if names:
        await on_chunk(json.dumps(jsonable(prediction[names[-1]]), default=str))


def _is_async(module: dspy.Module) -> bool:
    return callable(getattr(type(module), "aforward", None))


def _stream_field(module: dspy.Module) -> str | None:
    """The last ``str`` output field of the last predictor (the answer a user waits for)."""
    predictors = module.predictors()
    if not predictors:
        return None
    strings = [
        name
        for name, info in predictors[-1].signature.output_fields.items()
        if info.annotation is str and name != "reasoning"
    ]
    return strings[-1] if strings else None


async def _stream(
    module: dspy.Module, inputs: dict[str, Any], field: str, on_chunk: OnChunk
) -> Any:
    streamer = dspy.streamify(
        module,
        stream_listeners=[StreamListener(signature_field_name=field)],
        is_async_program=_is_async(module),
    )
    prediction, sent = None, False
    async for value in streamer(**inputs):
        if isinstance(value, StreamResponse) and value.chunk:
            await on_chunk(value.chunk)
            sent = True
        elif isinstance(value, dspy.Prediction):
            prediction = value
    if prediction is None:
        raise ProgramError(f"{type(module).__name__} streamed no prediction")
    if not sent and isinstance(prediction.get(field), str) and prediction.get(field):
        # A cache hit or a predictor copied per attempt streams nothing: send it whole.
        await on_chunk(prediction[field])
    return prediction


def _usage(totals: Mapping[str, Mapping[str, Any]]) -> TokenUsage:
    def total(key: str) -> int:
        return sum(int(entry.get(key) or 0) for entry in totals.values())

    return TokenUsage(total("prompt_tokens"), total("completion_tokens"), total("total_tokens"))


def _outputs(prediction: Any) -> dict[str, Any]:
    if not isinstance(prediction, dspy.Prediction):
        raise ProgramError(f"program returned {type(prediction).__name__}, not a Prediction")
    outputs = {k: jsonable(v) for k, v in prediction.items() if k not in _HIDDEN_OUTPUTS}
    # A signature's outputs are required: an empty text is no answer, not a silent success.
    empty = [
        name for name, value in outputs.items() if isinstance(value, str) and not value.strip()
    ]
    if empty:
        raise ProgramError(f"the LM gave an empty {empty[0]!r} output")
    return outputs


def _trace(module: dspy.Module, trace: list[Any]) -> list[dict[str, Any]]:
    names = {id(predictor): name for name, predictor in module.named_predictors()}
    return [
        {
            "predictor": names.get(id(predictor), predictor.signature.signature),
            "inputs": jsonable(call_inputs),
            "outputs": jsonable(dict(outputs.items())),
        }
        for predictor, call_inputs, outputs in trace
    ]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (models dumped, non-finite floats as None, else str)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return jsonable(dump(mode="json"))
    return str(value)
