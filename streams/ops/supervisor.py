"""Supervise DSPex's processes: start them, restart the ones that die, stop them cleanly.

``dspex up`` describes each process as a command line (``python -m dspex.agents router``,
``python -m dspex.agents worker --pool general`` ...), so this module never imports the
agents: the process boundary keeps ``streams`` independent of ``agents``. Children
inherit the environment, so they build the same settings as the parent, plus what
``env`` adds: ``dspex up`` names the cluster it started, so a child restarted while
that broker is down waits for it (librdkafka reconnects) instead of exiting because
no local broker is running.
"""

from __future__ import annotations

import logging
import os
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
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.children = [Child(name, list(argv)) for name, argv in children.items()]
        self._env = {**os.environ, **env} if env else None
        self._on_event = on_event
        self._max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._retiring: list[Child] = []
        self.undrained: list[str] = []  # killed at the last stop: did not drain in time

    def set_children(self, children: Mapping[str, Sequence[str]]) -> None:
        """Change the set of children while running: new names start, dropped ones drain.

        A dropped child gets SIGTERM (it finishes its in-flight work and commits)
        and is not restarted; kept names keep their process.
        """
        with self._lock:
            wanted = {name: list(argv) for name, argv in children.items()}
            kept = [c for c in self.children if c.name in wanted]
            for child in self.children:
                if child.name not in wanted:
                    self._retire(child)
            known = {c.name for c in kept}
            added = [Child(n, argv) for n, argv in wanted.items() if n not in known]
            self.children = kept + added
        for child in added:
            self._on_event(f"{child.name} added")

    def names(self) -> list[str]:
        """The current children's names."""
        with self._lock:
            return [c.name for c in self.children]

    def _retire(self, child: Child) -> None:
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
            self._retiring.append(child)
        logger.info("process retired name=%s", child.name)
        self._on_event(f"{child.name} retired")

    def run(self, stop: threading.Event, *, drain_timeout_s: float = 60.0) -> None:
        """Start every child, keep them alive until ``stop`` is set, then stop them all."""
        try:
            while not stop.is_set():
                self._tend()
                stop.wait(0.5)
        finally:
            self.stop_all(drain_timeout_s)

    def _tend(self) -> None:
        with self._lock:
            self._tend_locked()

    def _tend_locked(self) -> None:
        now = time.monotonic()
        self._retiring = [c for c in self._retiring if c.process and c.process.poll() is None]
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
        child.process = subprocess.Popen(child.argv, env=self._env)  # noqa: S603 - our own argv
        child.started_at = now
        logger.info("process started name=%s pid=%d", child.name, child.process.pid)
        self._on_event(f"{child.name} started (pid {child.process.pid})")

    def stop_all(self, timeout_s: float) -> list[str]:
        """SIGTERM every child (they drain in-flight work), SIGKILL what outlives the timeout.

        Bounded whether or not Kafka answers (a child whose broker is gone may wait for
        it): returns, and keeps in ``undrained``, the names of the children it killed.
        Their uncommitted work is redone by their successors (at-least-once).
        """
        with self._lock:
            children = [*self.children, *self._retiring]
        running = [(c, c.process) for c in children if c.process and c.process.poll() is None]
        for _, process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        self.undrained = []
        for child, process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error(
                    "process did not drain name=%s pid=%d timeout_s=%.0f",
                    child.name, process.pid, timeout_s,
                )  # fmt: skip
                process.kill()
                process.wait()
                self.undrained.append(child.name)
            self._on_event(f"{child.name} stopped (code {process.returncode})")
        return self.undrained
