"""The session history a program's ``History`` input gets, without importing DSPy.

The worker sets :data:`session_history` to a session's earlier turns around a
run (``dspex.agents.worker.sessions``); ``runtime.signatures.decode_inputs`` turns
it into the ``dspy.History`` value. A context variable, so concurrent requests of
one worker (each its own asyncio task) never see each other's history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

session_history: ContextVar[Sequence[Mapping[str, Any]]] = ContextVar(
    "dspex_session_history", default=()
)
"""The messages a History input gets in this context: the session's earlier turns, each
a dict of that program's input and output values (empty outside a session)."""
