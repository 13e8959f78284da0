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
"""

from __future__ import annotations

from dspex.streams.client.client import (
    AsyncClient,
    Chunk,
    Client,
    ClientClosed,
    JobOptions,
    JobProgress,
    JobResult,
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
from dspex.streams.settings import Settings, load_settings

__all__ = [
    "AsyncClient",
    "BrokerUnavailable",
    "Chunk",
    "Client",
    "ClientClosed",
    "ConfigError",
    "DSPexError",
    "InvalidRequest",
    "JobOptions",
    "JobProgress",
    "JobResult",
    "PermanentError",
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
