"""CPU accounting from ``/proc``: seconds used per process and by the whole machine.

Shared 2-core machines are noisy, so every phase records who used the CPU: the
router, each worker, this client process, the broker JVM and everything else.
Percent means share of one core (200% = both cores of a 2-core machine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICKS


def listening_pid(port: int) -> int | None:
    """The pid of the local process listening on TCP ``port`` (e.g. the broker), if any."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _owns_socket(proc, inodes):
            return int(proc.name)
    return None


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def _owns_socket(proc: Path, inodes: set[str]) -> bool:
    try:
        links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
    except OSError:
        return False
    return any(link.startswith("socket:[") and link[8:-1] in inodes for link in links)


@dataclass
class CpuMeter:
    """CPU use of named processes over one phase: ``start()``, run, ``stop()`` -> percents."""

    pids: Mapping[str, int | None]

    def start(self) -> None:
        self._wall = time.monotonic()
        self._machine = machine_busy_s()
        self._before = {name: _cpu(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float | None]:
        """``{name: percent of one core}``, plus ``machine`` and ``other`` (not ours)."""
        wall = max(time.monotonic() - self._wall, 1e-9)
        used: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            before, after = self._before[name], _cpu(pid)
            used[name] = None if before is None or after is None else (after - before) / wall * 100
        machine = (machine_busy_s() - self._machine) / wall * 100
        ours = sum(v for v in used.values() if v is not None)
        return {**used, "machine": machine, "other": max(machine - ours, 0.0)}


def _cpu(pid: int | None) -> float | None:
    return None if pid is None else process_cpu_s(pid)
