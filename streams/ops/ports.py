"""Local TCP ports: whether one is free, and a free one when the preferred is taken.

The local broker, the metrics agent's Prometheus exporter and the web dashboard
each have a default port; a second DSPex stack on the same machine finds them
taken and uses free ones instead (and says which).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

LOCALHOST = "127.0.0.1"


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """True when ``host:port`` can be bound the way servers bind it (SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port(host: str = LOCALHOST) -> int:
    """A port the kernel says is free now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def choose_port(preferred: int, taken: Sequence[int] = (), host: str = LOCALHOST) -> int:
    """``preferred`` when it is free and not in ``taken``, else any free port."""
    if preferred not in taken and port_is_free(preferred, host):
        return preferred
    while (port := free_port(host)) in taken:
        pass
    return port


def reachable_host(bind_host: str) -> str:
    """The address to print for a server bound to ``bind_host`` (all interfaces: loopback)."""
    return LOCALHOST if bind_host in ("", "0.0.0.0", "::") else bind_host  # noqa: S104
