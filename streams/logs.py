"""Logging set-up for DSPex entry points: structured ``key=value`` lines, quiet by default.

Library modules only call ``logging.getLogger(__name__)``; this module is called
once, by the process's entry point. A repeated line is written once per window
with a count (:class:`RepeatFilter`): a broker outage must leave a log an
operator can read, not thousands of identical connection errors.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"

# Libraries that are chatty at INFO; they speak up only at WARNING.
_NOISY = ("faust", "mode", "aiokafka", "LiteLLM", "litellm", "httpx", "urllib3")


REPEAT_WINDOW_S = 30.0
_DIGITS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Lets the first of a run of alike records through, then one per window with a count.

    Records are alike when logger, level and message agree once every number is
    blanked out (offsets, ports, milliseconds and librdkafka's own "N identical
    errors suppressed" differ between otherwise identical lines). Within
    ``window_s`` of the first, alike records are dropped and counted; the next one
    after the window is written with ``[N more like this since the last one]``.
    At most ``capacity`` kinds of line are remembered (least recently seen go first).
    """

    def __init__(
        self,
        window_s: float = REPEAT_WINDOW_S,
        *,
        capacity: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._window_s = window_s
        self._capacity = capacity
        self._clock = clock
        self._seen: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, _DIGITS.sub("#", record.getMessage()))
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._window_s:
            seen[1] += 1
            self._seen.move_to_end(key)
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.getMessage()} [{int(seen[1])} more like this since the last one]"
            record.args = None
        self._seen[key] = [now, 0.0]
        self._seen.move_to_end(key)
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True


# librdkafka lines about conditions it retries by itself and that heal in seconds (a
# fresh broker loading its coordinators): DEBUG, not a WARNING on every start.
_TRANSIENT = (
    "Coordinator load in progress: retrying",
    "Coordinator not available: retrying",
)


class TransientFilter(logging.Filter):
    """Demotes librdkafka's self-healing retry notices to DEBUG (dropped unless DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and any(t in record.getMessage() for t in _TRANSIENT):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure_logging(level: str = "WARNING") -> None:
    """Send every log record to stderr in one format at ``level``, repeats summarised."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    librdkafka = logging.getLogger("librdkafka")
    if not any(isinstance(f, TransientFilter) for f in librdkafka.filters):
        librdkafka.addFilter(TransientFilter())
    # DSPy sets propagate=False on its logger at import: re-attach it to ours.
    dspy_logger = logging.getLogger("dspy")
    dspy_logger.handlers[:] = []
    dspy_logger.propagate = True
