"""DSPex: run DSPy programs behind Apache Kafka — the public API for applications.

Installed, this file is both ``dspex`` and ``dspex.streams`` (see
``deploy/packaging/hatch_build.py``), so applications write::

    from dspex import Client, Program

    with Client() as client:
        result = client.submit("support.answer", {"question": "Capital of France?"})

Everything here needs only the light client dependencies (confluent-kafka,
fastavro, pydantic); the agent processes live in ``dspex.agents`` and need the
``server`` extra. The error tree is drawn in :mod:`dspex.streams.errors` and
:mod:`dspex.streams.client.client`.

The names load on first use (PEP 562): ``import dspex`` stays instant, so
``python -m dspex.agents`` can take SIGTERM before anything heavy is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspex.streams.client.client import (
        AsyncClient,
        Chunk,
        Client,
        ClientClosed,
        JobOptions,
        JobProgress,
        JobResult,
        PipelineRef,
        Program,
        RequestFailed,
        RequestOptions,
        RequestTimeout,
        Result,
        VariableOptions,
        VariableScope,
    )
    from dspex.streams.errors import (
        BrokerUnavailable,
        ConfigError,
        DSPexError,
        InvalidRequest,
        PermanentError,
        ProgramError,
        RetryableError,
    )
    from dspex.streams.pipelines.problems import InvalidPipeline
    from dspex.streams.pipelines.spec import Pipeline
    from dspex.streams.settings import Settings, load_settings

# where the public names live, searched in this order on first use
_HOMES = (
    "dspex.streams.client.client",
    "dspex.streams.errors",
    "dspex.streams.settings",
    "dspex.streams.pipelines.spec",
    "dspex.streams.pipelines.problems",
)

__all__ = [
    "AsyncClient",
    "BrokerUnavailable",
    "Chunk",
    "Client",
    "ClientClosed",
    "ConfigError",
    "DSPexError",
    "InvalidPipeline",
    "InvalidRequest",
    "JobOptions",
    "JobProgress",
    "JobResult",
    "PermanentError",
    "Pipeline",
    "PipelineRef",
    "Program",
    "ProgramError",
    "RequestFailed",
    "RequestOptions",
    "RequestTimeout",
    "Result",
    "RetryableError",
    "Settings",
    "VariableOptions",
    "VariableScope",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        for home in _HOMES:
            value = getattr(importlib.import_module(home), name, None)
            if value is not None:
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
