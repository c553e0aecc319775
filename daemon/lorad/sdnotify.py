"""Tell systemd how the daemon is doing, for `Type=notify` units with `WatchdogSec=`.

sd_notify(3) is one AF_UNIX datagram per message ("READY=1", "STATUS=…",
"WATCHDOG=1", "STOPPING=1") to the socket in $NOTIFY_SOCKET; a leading "@"
names the abstract namespace. Under launchd or in a terminal the variable is
unset and every call does nothing, so the daemon can always call it.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send one message of KEY=VALUE fields; False when not under systemd or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not fields:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def child_env(env: dict[str, str]) -> dict[str, str]:
    """The environment for a child process: only the daemon speaks to systemd."""
    return {k: v for k, v in env.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
