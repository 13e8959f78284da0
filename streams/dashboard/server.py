"""The web dashboard's server: one follower thread feeding a Board, a small HTTP server.

Standard library only (``http.server``), so the dashboard runs wherever the
client does (``pip install dspex``, no server extra) and starts in ``dspex up``
without another process. Routes:

- ``/`` the page, ``/static/...`` its script, styles and the vendored uPlot;
- ``/api/state`` the board as JSON (:meth:`Board.state`);
- ``/api/events`` server-sent events: the board as an ``event: state`` at once and
  again after every change (at most :data:`MIN_INTERVAL_S` apart), a comment line
  every :data:`KEEPALIVE_S` when nothing changes.

The follower joins no consumer group and commits nothing, so any number of
dashboards and ``dspex top`` sessions can watch one cluster.
"""

from __future__ import annotations

import errno
import json
import logging
import mimetypes
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from dspex.schemas.records import Record
from dspex.streams.dashboard.board import Board
from dspex.streams.errors import ConfigError
from dspex.streams.ops.ports import reachable_host
from dspex.streams.reader import Apply, TopicFollower
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MIN_INTERVAL_S = 0.5
KEEPALIVE_S = 15.0
POLL_S = 0.5
RETRY_S = 5.0  # between attempts to reach the topics
CONNECT_TIMEOUT_S = 30.0  # topics created a moment ago may have no leader yet
STOP_WAIT_S = 5.0


class Follower(Protocol):
    """What the dashboard reads records with (a TopicFollower; a fake in unit tests)."""

    def poll(self, seconds: float, apply: Apply) -> None: ...

    def close(self) -> None: ...


class Dashboard:
    """Follows ``metrics``, ``routing`` and ``dlq`` into a :class:`Board`; serves it over HTTP.

    ``port`` 0 takes any free port; a taken port falls back to a free one (logged).
    The server listens once constructed; :attr:`url` says where; ``start()`` serves.
    The topics are reached from the follow thread: until that works (no broker, no
    topics yet) the page is served and shows why it has no figures, and it retries.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        host: str | None = None,
        port: int | None = None,
        follower: Follower | None = None,
    ) -> None:
        config = settings.dashboard
        topics = Topics(settings.topics)
        self.metrics, self.routing = topics.name("metrics"), topics.name("routing")
        self.dlq = topics.name("dlq")
        self.board = Board(config.history_s, settings.metrics.window_s)
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.settings = settings
        self.follower = follower  # else connected by the follow thread, retried until it works
        self.host = host if host is not None else config.bind_host
        self.httpd = _listen(self.host, config.port if port is None else port, self)
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{reachable_host(self.host)}:{self.port}/"

    def start(self) -> None:
        """Start following and serving (two daemon threads)."""
        for name, target in (("dashboard-follow", self._follow), ("dashboard-http", self._serve)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving and following; open event streams end."""
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        if self._threads:  # shutdown() waits for serve_forever(), which start() began
            self.httpd.shutdown()
        self.httpd.server_close()
        for thread in self._threads:
            thread.join(STOP_WAIT_S)
        # a follow thread still connecting (a broker that does not answer) is a daemon:
        # it ends with the process; its consumer must not be closed under it
        if self.follower is not None and not any(t.is_alive() for t in self._threads):
            self.follower.close()

    def state_json(self) -> tuple[int, bytes]:
        """The board's version and its JSON."""
        with self.changed:
            state = self.board.state()
        return int(state["version"]), json.dumps(state, separators=(",", ":")).encode()

    def _serve(self) -> None:
        self.httpd.serve_forever(poll_interval=0.5)

    def _follow(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.follower is None:
                    self.follower = self._connect()
                self.follower.poll(POLL_S, self._apply)
                self._set_problem(None)
            except Exception as exc:  # no broker or topics yet: the page says so, we retry
                problem = " ".join(str(exc).split())
                if problem != self.board.problem:  # said once, not every retry
                    logger.warning("dashboard: cannot read the topics: %s", problem)
                self._set_problem(problem)
                self.stopping.wait(RETRY_S)

    def _connect(self) -> TopicFollower:
        since = self.board.since_ms()
        return TopicFollower(
            self.settings,
            make_serde(self.settings),
            {self.metrics: since, self.routing: None, self.dlq: since},
            on_skip=lambda line: logger.warning("dashboard %s", line),
            timeout_s=CONNECT_TIMEOUT_S,
        )

    def _set_problem(self, problem: str | None) -> None:
        with self.changed:
            if self.board.problem != problem:
                self.board.problem = problem
                self.board.version += 1
                self.changed.notify_all()

    def _apply(self, topic: str, key: str, record: Record | None) -> None:
        with self.changed:
            if topic == self.routing:
                self.board.take_table(key, record)
            elif record is None:
                return
            elif topic == self.dlq:
                self.board.take_dead_letter(record)
            else:
                self.board.take_snapshot(record)
            self.changed.notify_all()

    def wait_for_change(self, seen: int, timeout_s: float) -> bool:
        """Block until the board's version differs from ``seen`` (or stop, or timeout)."""
        with self.changed:
            return self.changed.wait_for(
                lambda: self.board.version != seen or self.stopping.is_set(), timeout_s
            )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard


def _listen(host: str, port: int, dashboard: Dashboard) -> _Server:
    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port == 0:
            raise ConfigError(f"dashboard: cannot listen on {host}:{port}: {exc}") from exc
        server = _Server((host, 0), _Handler)
        logger.warning("dashboard port %s taken; listening on %s", port, server.server_address[1])
    server.dashboard = dashboard
    return server


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "dspex-dashboard"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api/state":
            self._send(HTTPStatus.OK, "application/json", self.server.dashboard.state_json()[1])
        elif path == "/api/events":
            self._events()
        elif path in ("/", "/index.html"):
            self._file(STATIC / "index.html")
        elif path.startswith("/static/"):
            self._file(STATIC / path.removeprefix("/static/"))
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

    def _file(self, path: Path) -> None:
        resolved = path.resolve()
        if not resolved.is_file() or not resolved.is_relative_to(STATIC):
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
            return
        kind = mimetypes.guess_type(resolved.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, kind, resolved.read_bytes())

    def _send(self, status: HTTPStatus, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        dashboard = self.server.dashboard
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        seen = -1
        try:
            while not dashboard.stopping.is_set():
                if dashboard.wait_for_change(seen, KEEPALIVE_S):
                    seen, body = dashboard.state_json()
                    self.wfile.write(b"event: state\ndata: " + body + b"\n\n")
                else:
                    self.wfile.write(b": keepalive\n\n")
                self.wfile.flush()
                time.sleep(MIN_INTERVAL_S)
        except (BrokenPipeError, ConnectionResetError):
            return  # the page went away

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("dashboard %s %s", self.address_string(), format % args)
