"""Supervise DSPex's processes: start them, restart the ones that die, stop them cleanly.

``dspex up`` describes each process as a command line (``python -m agents router``,
``python -m agents worker --pool general`` ...), so this module never imports the
agents: the process boundary keeps ``streams`` independent of ``agents``. Children
inherit the environment, so they build the same settings (and find the same local
broker) as the parent.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class Child:
    """One supervised process and its restart bookkeeping."""

    name: str
    argv: Sequence[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    """Runs children until told to stop; a child that exits is restarted with back-off."""

    def __init__(
        self,
        children: Mapping[str, Sequence[str]],
        *,
        on_event: Callable[[str], None] = lambda line: None,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.children = [Child(name, list(argv)) for name, argv in children.items()]
        self._on_event = on_event
        self._max_backoff_s = max_backoff_s

    def run(self, stop: threading.Event, *, drain_timeout_s: float = 60.0) -> None:
        """Start every child, keep them alive until ``stop`` is set, then stop them all."""
        try:
            while not stop.is_set():
                self._tend()
                stop.wait(0.5)
        finally:
            self.stop_all(drain_timeout_s)

    def _tend(self) -> None:
        now = time.monotonic()
        for child in self.children:
            code = child.process.poll() if child.process else None
            if child.process is not None and code is None:
                if now - child.started_at > 60:
                    child.restarts = 0  # stable for a minute: forget past crashes
                continue
            if child.process is not None:
                self._died(child, code, now)
            if now >= child.next_start:
                self._start(child, now)

    def _died(self, child: Child, code: int | None, now: float) -> None:
        child.process = None
        child.restarts += 1
        delay = min(self._max_backoff_s, 0.5 * 2 ** min(child.restarts, 8))
        child.next_start = now + delay
        logger.warning("process exited name=%s code=%s restart_in_s=%.1f", child.name, code, delay)
        self._on_event(f"{child.name} exited with code {code}; restarting in {delay:.1f}s")

    def _start(self, child: Child, now: float) -> None:
        child.process = subprocess.Popen(child.argv)  # noqa: S603 - our own argv
        child.started_at = now
        logger.info("process started name=%s pid=%d", child.name, child.process.pid)
        self._on_event(f"{child.name} started (pid {child.process.pid})")

    def stop_all(self, timeout_s: float) -> None:
        """SIGTERM every child (they drain in-flight work), SIGKILL what outlives the timeout."""
        running = [(c, c.process) for c in self.children if c.process and c.process.poll() is None]
        for _, process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child, process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("process did not drain name=%s pid=%d", child.name, process.pid)
                process.kill()
                process.wait()
            self._on_event(f"{child.name} stopped (code {process.returncode})")
