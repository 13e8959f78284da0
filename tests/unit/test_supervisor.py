"""The supervisor restarts children that die and stops all of them on request."""

from __future__ import annotations

import sys
import threading
import time

from streams.supervisor import Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
CRASHER = [sys.executable, "-c", "raise SystemExit(3)"]
# Exits 0 on SIGTERM (the drain path), like the real agents.
DRAINER = [
    sys.executable,
    "-c",
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "time.sleep(60)",
]


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
