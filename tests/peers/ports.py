"""Free TCP ports on loopback for test peers (shared helper).

A port the OS picks (bind to port 0) comes from its ephemeral range — the range it also gives to
every outgoing connection. Between our pick and the peer's bind, a client socket of another test
(httpx, storescu, a C-MOVE sub-association...) could take it: seen once as "address already in
use" for a front-end's HTTP port. So ports are picked below that range, where the OS never
assigns client ports, checked bindable, and never handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading

_given: set[int] = set()
_lock = threading.Lock()
_SPAN = 12_000  # ports tried below the ephemeral range


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1, free now, outside the ephemeral range, not given out before."""
    low = _ephemeral_low()
    first = max(1024, low - _SPAN)
    with _lock:
        for _ in range(200):
            port = random.randrange(first, low)
            if port not in _given and _bindable(port):
                _given.add(port)
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # crowded: let the OS pick
            sock.bind(("127.0.0.1", 0))
            picked: int = sock.getsockname()[1]
            _given.add(picked)
            return picked
