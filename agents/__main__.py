"""``python -m dspex.agents router|learner|metrics|sessions|worker --pool P|jobs``: one agent.

``dspex up`` starts these through its supervisor; they can also be run (and scaled)
by hand, by systemd or by Kubernetes. Settings come from the environment and
``--settings FILE``, exactly as for ``dspex`` (the commands: :mod:`dspex.agents.cli`).

A SIGTERM that arrives while the process is still starting (importing DSPy, faust
and the rest takes seconds) stops it cleanly with exit code 0: nothing has been
consumed yet. Once an agent runs, its event loop handles SIGTERM itself (drain,
commit, exit 0).

Without the ``server`` extra (a client-only ``pip install dspex``) it prints one
line naming what to install and exits 1, before importing anything heavy.
"""

from __future__ import annotations

import signal
from types import FrameType

from dspex.streams.ops.extras import require_server_extra


def _stopped_while_starting(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    """Take SIGTERM first, check the server extra, then load the (slow) commands and run one."""
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    require_server_extra()
    from dspex.agents.cli import main as run_command

    run_command()


if __name__ == "__main__":
    main()
