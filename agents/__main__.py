"""``python -m dspex.agents router|learner|metrics|worker --pool NAME|jobs``: one agent process.

``dspex up`` starts these through its supervisor; they can also be run (and scaled)
by hand, by systemd or by Kubernetes. Settings come from the environment and
``--settings FILE``, exactly as for ``dspex`` (the commands: :mod:`dspex.agents.cli`).

A SIGTERM that arrives while the process is still starting (importing DSPy, faust
and the rest takes seconds) stops it cleanly with exit code 0: nothing has been
consumed yet. Once an agent runs, its event loop handles SIGTERM itself (drain,
commit, exit 0).
"""

from __future__ import annotations

import signal
from types import FrameType


def _stopped_while_starting(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    """Take SIGTERM first, then load the (slow to import) commands and run one."""
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    from dspex.agents.cli import main as run_command

    run_command()


if __name__ == "__main__":
    main()
