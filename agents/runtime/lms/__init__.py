"""LM backends for programs: :func:`build_lm` picks one per configured backend.

A family: ``base`` (model names, :class:`~base.InlineLM`, prompt parsing) under
``echo`` (EchoLM, a deterministic simulation), ``simulations`` (labelled toy-task
simulations), ``local_model`` (llama.cpp) and LiteLLM (any other model string).
Heavy backends are imported only where they are used.
"""

from __future__ import annotations

import dspy

from dspex.agents.runtime.lms.base import ECHO_MODEL, LLAMA_CPP_MODEL, SIM_PREFIX
from dspex.agents.runtime.lms.echo import EchoLM
from dspex.streams.settings import LMBackend

__all__ = ["build_lm"]


def build_lm(backend: LMBackend, *, cache: bool = False) -> dspy.BaseLM:
    """The DSPy LM for one configured backend (credentials come from settings only)."""
    if backend.model == ECHO_MODEL:
        return EchoLM(cache=cache)
    if backend.model == LLAMA_CPP_MODEL:
        from dspex.agents.runtime.lms.local_model import (
            LlamaCppLM,  # loads llama.cpp only where it is used
        )

        return LlamaCppLM(backend, cache=cache)
    if backend.model.startswith(SIM_PREFIX):  # dspex/sim?...: labelled simulations (tests, demos)
        from dspex.agents.runtime.lms.simulations import SimulatedLM

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
