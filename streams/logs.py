"""Logging set-up for DSPex entry points: structured ``key=value`` lines, quiet by default.

Library modules only call ``logging.getLogger(__name__)``; this module is called
once, by the process's entry point.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"

# Libraries that are chatty at INFO; they speak up only at WARNING.
_NOISY = ("faust", "mode", "aiokafka", "LiteLLM", "litellm", "httpx", "urllib3")


def configure_logging(level: str = "WARNING") -> None:
    """Send every log record to stderr in one format at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # DSPy sets propagate=False on its logger at import: re-attach it to ours.
    dspy_logger = logging.getLogger("dspy")
    dspy_logger.handlers[:] = []
    dspy_logger.propagate = True
