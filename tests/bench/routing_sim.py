"""SIMULATED LM backends for the routing benchmark: small OpenAI-compatible HTTP servers.

Nothing here is a model. Each backend is an aiohttp server on 127.0.0.1 that
answers ``POST /v1/chat/completions`` for the benchmark's toy task ("#000123
What is 17 + 25? ...") in DSPy's ChatAdapter format, and draws, per call:

* its latency from a lognormal distribution (``median_ms``, ``sigma``);
* whether it fails with HTTP ``error_status`` (500 or 429), with ``error_rate``;
* whether its answer is right, with probability ``quality`` (a wrong answer is
  the sum plus a nonzero offset).

Every draw is a pure function of (seed, backend, question id, call number), so
the same request meets the same latency, error and answer on the same backend in
every arm and every run. A backend can be *degraded* mid-run (latency times a
factor, a new error rate) through the control server.

The servers run in their own process (``python -m tests.bench.routing_sim``)
so that a busy client (LiteLLM's router is CPU-hungry) cannot delay their
timers: :class:`SimFleet` starts it, and talks to its control endpoints
(``/reset``, ``/degrade``, ``/calls``).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

from aiohttp import web

_QUESTION = re.compile(r"#(\d+) What is (\d+) \+ (\d+)\?")
_NORMAL = NormalDist()


@dataclass(frozen=True)
class Backend:
    """One simulated backend's profile (a SIMULATION: nothing is computed by a model)."""

    name: str
    median_ms: float
    sigma: float
    error_rate: float
    error_status: int
    quality: float


@dataclass(frozen=True)
class Degradation:
    """A backend that degrades: latency times ``latency_factor``, a new error rate and status.

    The default is an overloaded backend: four times slower, a quarter of its calls
    refused with 429 (which LiteLLM's router answers with a cooldown).
    """

    latency_factor: float = 4.0
    error_rate: float = 0.25
    error_status: int = 429


@dataclass(frozen=True)
class Draw:
    """One call's fate on one backend."""

    latency_s: float
    error: bool
    correct: bool


def draw(
    seed: int,
    backend: Backend,
    qid: int,
    call: int,
    degraded: Degradation | None = None,
    time_scale: float = 1.0,
) -> Draw:
    """The latency, error and answer correctness of call ``call`` (0-based) for question ``qid``.

    The answer does not depend on ``call``: a backend asked again (a retry) gives
    the same answer, as a model at temperature 0 would.
    """
    rng = random.Random(f"{seed}|{backend.name}|{qid}|{call}")
    u_latency, u_error = rng.random(), rng.random()
    z = _NORMAL.inv_cdf(min(max(u_latency, 1e-9), 1 - 1e-9))
    latency_s = backend.median_ms / 1000.0 * math.exp(backend.sigma * z) * time_scale
    error_rate = backend.error_rate
    if degraded is not None:
        latency_s *= degraded.latency_factor
        error_rate = degraded.error_rate
    right = random.Random(f"{seed}|{backend.name}|{qid}|answer").random() < backend.quality
    return Draw(latency_s, u_error < error_rate, right)


def answer_for(question: str, correct: bool, qid: int) -> str | None:
    """The (right or wrong) answer to the toy question, None when it is not one."""
    found = _QUESTION.search(question)
    if found is None:
        return None
    total = int(found.group(2)) + int(found.group(3))
    return str(total if correct else total + 1 + qid % 9)


def question_id(text: str) -> int | None:
    found = _QUESTION.search(text)
    return int(found.group(1)) if found else None


@dataclass
class _Served:
    """One backend's mutable state inside the server process."""

    backend: Backend
    degraded: Degradation | None = None
    calls_per_question: dict[int, int] = field(default_factory=dict)


class _Fleet:
    """The server process's state: every backend, and one log of calls across them."""

    def __init__(self, backends: list[Backend], seed: int, time_scale: float) -> None:
        self.served = {b.name: _Served(b) for b in backends}
        self.seed = seed
        self.time_scale = time_scale
        self.log: list[dict[str, Any]] = []

    def reset(self) -> None:
        for served in self.served.values():
            served.degraded = None
            served.calls_per_question.clear()
        self.log.clear()

    def favourite(self, window: int) -> str:
        """The backend that got the first call of most of the last ``window`` questions."""
        firsts: dict[int, str] = {}
        for call in self.log:
            firsts.setdefault(call["qid"], call["backend"])
        recent = [firsts[q] for q in sorted(firsts)[-window:]]
        names = sorted(self.served)
        return max(names, key=lambda name: (recent.count(name), -names.index(name)))

    async def complete(self, name: str, request: web.Request) -> web.Response:
        body = await request.json()
        text = _last_user_text(body.get("messages") or [])
        qid = question_id(text)
        if qid is None:
            return _error(400, "the simulation only answers the benchmark's questions")
        served = self.served[name]
        call = served.calls_per_question.get(qid, 0)
        served.calls_per_question[qid] = call + 1
        fate = draw(self.seed, served.backend, qid, call, served.degraded, self.time_scale)
        failing = served.degraded or served.backend
        status = failing.error_status if fate.error else 200
        service_s = fate.latency_s * (0.1 if fate.error else 1.0)
        self.log.append(
            {
                "backend": name,
                "qid": qid,
                "call": call,
                "at": time.monotonic(),
                "status": status,
                "service_s": round(service_s, 4),
            }
        )
        await asyncio.sleep(service_s)  # errors come back fast: a tenth of the latency
        if fate.error:
            return _error(status, f"simulated {status} from {name}")
        reply = (
            f"[[ ## answer ## ]]\n{answer_for(text, fate.correct, qid)}\n\n[[ ## completed ## ]]"
        )
        return web.json_response(_completion(name, qid, call, body, text, reply))


def _last_user_text(messages: list[Mapping[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def _completion(
    name: str, qid: int, call: int, body: Mapping[str, Any], prompt: str, reply: str
) -> dict[str, Any]:
    prompt_tokens, completion_tokens = len(prompt.split()), len(reply.split())
    return {
        "id": f"sim-{name}-{qid}-{call}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error(status: int, message: str) -> web.Response:
    kind = "rate_limit_error" if status == 429 else "server_error"
    payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(payload, status=status)


def _control_app(fleet: _Fleet) -> web.Application:
    async def reset(_: web.Request) -> web.Response:
        fleet.reset()
        return web.json_response({"ok": True})

    async def degrade(request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("backend") or fleet.favourite(int(body["window"]))
        fleet.served[name].degraded = Degradation(**body["degradation"])
        return web.json_response({"backend": name})

    async def calls(_: web.Request) -> web.Response:
        return web.json_response(fleet.log)

    app = web.Application()
    app.router.add_post("/reset", reset)
    app.router.add_post("/degrade", degrade)
    app.router.add_get("/calls", calls)
    return app


def _backend_app(fleet: _Fleet, name: str) -> web.Application:
    async def complete(request: web.Request) -> web.Response:
        return await fleet.complete(name, request)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/chat/completions", complete)
    return app


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def _serve(config: Mapping[str, Any]) -> None:
    backends = [Backend(**b) for b in config["backends"]]
    fleet = _Fleet(backends, int(config["seed"]), float(config["time_scale"]))
    apps = {"control": _control_app(fleet)} | {
        b.name: _backend_app(fleet, b.name) for b in backends
    }
    ports: dict[str, int] = {}
    runners = []
    for name, app in apps.items():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = _listening_socket()
        await web.SockSite(runner, sock).start()
        ports[name] = sock.getsockname()[1]
        runners.append(runner)
    print(json.dumps({"ports": ports}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


class SimFleet:
    """The simulated backends' server process, seen from the benchmark (a context manager)."""

    def __init__(self, backends: list[Backend], seed: int, time_scale: float = 1.0) -> None:
        self.backends = backends
        config = {"backends": [asdict(b) for b in backends], "seed": seed, "time_scale": time_scale}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.routing_sim", json.dumps(config)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._proc.stdout.readline() if self._proc.stdout else ""
        if not line:
            self.close()
            raise RuntimeError("the simulated backends did not start")
        self.ports: dict[str, int] = json.loads(line)["ports"]

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def api_base(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/v1"

    def reset(self) -> None:
        """Forget every call and undo any degradation (between arms)."""
        self._control("POST", "/reset", {})

    def degrade(self, degradation: Degradation, window: int, backend: str | None = None) -> str:
        """Degrade ``backend``, else the one that got most of the last ``window`` questions."""
        body = {"backend": backend, "window": window, "degradation": asdict(degradation)}
        name: str = self._control("POST", "/degrade", body)["backend"]
        return name

    def calls(self) -> list[dict[str, Any]]:
        """Every call: backend, question id, call number, monotonic time, status, service s."""
        log: list[dict[str, Any]] = self._control("GET", "/calls", None)
        return log

    def _control(self, method: str, path: str, body: object) -> Any:
        data = None if body is None else json.dumps(body).encode()
        url = f"http://127.0.0.1:{self.ports['control']}{path}"
        request = urllib.request.Request(url, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return json.loads(response.read())

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._proc.stdout:
            self._proc.stdout.close()


def iter_first_calls(calls: list[dict[str, Any]]) -> Iterator[tuple[int, str]]:
    """(question id, backend of its first call), in question order."""
    firsts: dict[int, str] = {}
    for call in sorted(calls, key=lambda c: c["at"]):
        firsts.setdefault(call["qid"], call["backend"])
    yield from sorted(firsts.items())


if __name__ == "__main__":
    asyncio.run(_serve(json.loads(sys.argv[1])))
