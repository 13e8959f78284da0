"""The supervisor restarts children that die and stops all of them on request."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from dspex.streams.ops.supervisor import Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
CRASHER = [sys.executable, "-c", "raise SystemExit(3)"]
# Exits 0 on SIGTERM (the drain path), like the real agents; given a path, it writes
# "ready" there once its handler is installed.
DRAINER = [
    sys.executable,
    "-c",
    "import pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "sys.argv[1:] and pathlib.Path(sys.argv[1]).write_text('ready')\n"
    "time.sleep(60)",
]


def drainer(ready: Path) -> list[str]:
    """A DRAINER that says when it is ready to drain."""
    return [*DRAINER, str(ready)]


def test_crashing_child_is_restarted_and_all_stop_cleanly() -> None:
    events: list[str] = []
    sup = Supervisor(
        {"sleeper": SLEEPER, "crasher": CRASHER, "drainer": DRAINER}, on_event=events.append
    )
    stop = threading.Event()
    runner = threading.Thread(target=sup.run, args=(stop,), kwargs={"drain_timeout_s": 10})
    runner.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum("crasher started" in e for e in events) < 2:
        time.sleep(0.1)
    stop.set()
    runner.join(30)
    assert not runner.is_alive()
    assert sum("crasher started" in e for e in events) >= 2
    assert any("crasher exited with code 3" in e for e in events)
    assert any(e == "drainer stopped (code 0)" for e in events)
    for child in sup.children:
        assert child.process is None or child.process.poll() is not None


def test_children_can_be_added_and_retired_while_running(tmp_path: Path) -> None:
    events: list[str] = []
    sup = Supervisor({"w-1": DRAINER}, on_event=events.append)
    stop = threading.Event()
    runner = threading.Thread(target=sup.run, args=(stop,), kwargs={"drain_timeout_s": 10})
    runner.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 20
        while not any(text in e for e in events):
            assert time.monotonic() < deadline, (text, events)
            time.sleep(0.05)

    def wait_ready(ready: Path) -> None:  # its SIGTERM handler is installed, as an agent's
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, (ready, events)
            time.sleep(0.05)

    try:
        wait_for("w-1 started")
        first = sup.children[0].process
        sup.set_children({"w-1": DRAINER, "w-2": DRAINER, "w-3": drainer(tmp_path / "w-3")})
        wait_for("w-3 started")
        assert sup.names() == ["w-1", "w-2", "w-3"]
        assert sup.children[0].process is first  # a kept child keeps its process
        retired = sup.children[2].process
        wait_ready(tmp_path / "w-3")
        sup.set_children({"w-1": DRAINER, "w-2": DRAINER})
        wait_for("w-3 retired")
        assert retired is not None and retired.wait(10) == 0  # drained on SIGTERM
        # A marker: a child added now starts in a later pass of the supervisor's loop, the
        # pass that would have seen w-3 exit (and then restarted it) had it been kept.
        sup.set_children({"w-1": DRAINER, "w-2": DRAINER, "w-4": drainer(tmp_path / "w-4")})
        wait_for("w-4 started")
        assert not any("w-3 exited" in e for e in events)  # a retired child is not restarted
        assert sum("w-3 started" in e for e in events) == 1
        marker = sup.children[2].process
        wait_ready(tmp_path / "w-4")
        sup.set_children({"w-1": DRAINER, "w-2": DRAINER})
        assert marker is not None and marker.wait(10) == 0
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    assert {e for e in events if e.endswith("stopped (code 0)")} == {
        "w-1 stopped (code 0)",
        "w-2 stopped (code 0)",
    }


def test_children_get_the_extra_environment_on_every_start(tmp_path: object) -> None:
    from pathlib import Path

    out = Path(str(tmp_path)) / "seen"
    # appends what it sees, then exits 1: the supervisor restarts it with the same env
    reporter = [
        sys.executable,
        "-c",
        f"import os; seen = os.environ['DSPEX_KAFKA__BOOTSTRAP_SERVERS']; "
        f"open({str(out)!r}, 'a').write(seen + '\\n'); raise SystemExit(1)",
    ]
    sup = Supervisor({"reporter": reporter}, env={"DSPEX_KAFKA__BOOTSTRAP_SERVERS": "10.9.8.7:9"})
    stop = threading.Event()
    runner = threading.Thread(target=sup.run, args=(stop,), kwargs={"drain_timeout_s": 10})
    runner.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().split()) < 2):
        time.sleep(0.1)
    stop.set()
    runner.join(30)
    assert out.read_text().split()[:2] == ["10.9.8.7:9", "10.9.8.7:9"]


def test_a_child_that_does_not_drain_is_killed_and_named(tmp_path: Path) -> None:
    """Bounded whether or not a child cooperates: SIGKILL after the drain timeout, named."""
    ignorer = [
        sys.executable,
        "-c",
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[1]).write_text('ready')\n"
        "time.sleep(60)",
    ]
    events: list[str] = []
    ready = [tmp_path / "stuck", tmp_path / "drainer"]
    children = {"stuck": [*ignorer, str(ready[0])], "drainer": drainer(ready[1])}
    sup = Supervisor(children, on_event=events.append)
    stop = threading.Event()
    runner = threading.Thread(target=sup.run, args=(stop,), kwargs={"drain_timeout_s": 1})
    runner.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(path.exists() for path in ready):
        time.sleep(0.05)
    stop.set()
    runner.join(30)
    assert not runner.is_alive()
    assert sup.undrained == ["stuck"]
    assert "stuck stopped (code -9)" in events
    assert "drainer stopped (code 0)" in events
