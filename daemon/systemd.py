"""systemd glue: readiness and status (sd_notify), the watchdog, the journal, socket activation.

Everything goes through systemd-python when it is installed; where it is not (it builds from
source), the same few lines of the sd_notify and LISTEN_FDS protocols are spoken directly, and
logs go to stderr. Outside systemd (no NOTIFY_SOCKET, no LISTEN_FDS) every call here is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from .control import replica_error
from .logfmt import one_line

try:  # optional: the daemon runs without it
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - depends on the machine
    _sd_daemon = None
    _sd_journal = None

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


EXTEND_EVERY = 10.0  # seconds between asks for more start-up time while the first scan runs
EXTEND_BY_USEC = 60_000_000  # each ask: this long from now


class Notifier:
    """Sends sd_notify messages; keeps the watchdog fed at half its interval."""

    def __init__(self, env: dict[str, str] | None = None, clock: Any = time.monotonic):
        env = dict(os.environ) if env is None else env
        self.socket_path = env.get("NOTIFY_SOCKET", "")
        self.clock = clock
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_every = 0.0
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_every = int(usec) / 1e6 / 2
        self._last_watchdog = 0.0
        self._last_status = ""
        self._ready = False
        self._last_extend = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def send(self, text: str) -> None:
        """One notice to systemd. A notice that cannot be sent (the socket gone, systemd busy)
        is not the daemon's trouble: said at debug level, never raised."""
        if not self.socket_path:
            return
        try:
            if _sd_daemon is not None and self.socket_path == os.environ.get("NOTIFY_SOCKET"):
                _sd_daemon.notify(text)
                return
            addr = self.socket_path
            if addr.startswith("@"):
                addr = "\0" + addr[1:]
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(text.encode(), addr)
        except OSError as e:
            log.debug("sd_notify to %s failed: %s", self.socket_path, e)

    def ready(self, status: str) -> None:
        self._ready = True
        self._last_status = status
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def tick(self) -> None:
        """Called from the engine loop (and from a scan, once per directory): the loop that
        would hang is the one that pets the dog. Before READY (the first scan of a big tree,
        or of one much changed while the daemon was stopped, can outlast systemd's start
        timeout), each call that finds the scan still going asks for more time."""
        now = self.clock()
        if self.watchdog_every and now - self._last_watchdog >= self.watchdog_every:
            self._last_watchdog = now
            self.send("WATCHDOG=1")
        if not self._ready and now - self._last_extend >= EXTEND_EVERY:
            self._last_extend = now
            self.send(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets newer systemd (Type=notify-reload) match RELOADING to the reload.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def reloaded(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")


def status_line(st: dict[str, Any]) -> str:
    """One line for `systemctl status`: what the daemon does, and how the peers are."""
    peers = st["peers"]
    up = [p for p in peers if p["connected"]]
    whole = replica_error(st)
    if st["state"] == "error" and whole:
        head = "error: " + whole.split(":")[0]  # e.g. "the root /media/usb/home is not there"
    elif st["state"] in ("starting", "scanning", "paused", "error"):
        head = st["state"]
    else:
        need = [(p["need_bytes"], p["need_files"], p["name"]) for p in up if p["need_files"]]
        if need:
            size, files, name = max(need)
            head = f"syncing {_human(size)} ({files} files) from {name}"
        else:
            head = "idle"
    text = f"{head}; {len(up)} of {len(peers)} peers connected"
    if up and all(p["in_sync"] for p in up):
        text += "; in sync"
    if st["errors"]:
        text += f"; {len(st['errors'])} errors"
    if st["conflicts"]:
        text += f"; {st['conflicts']} conflicts"
    return text


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.0f} B"


def inherited_socket(env: dict[str, str] | None = None) -> socket.socket | None:
    """The control socket systemd passed us (socket activation), if it did."""
    env = dict(os.environ) if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if n < 1:
        return None
    fd = SD_LISTEN_FDS_START
    if n > 1:
        log.warning("systemd passed %d sockets; using the first as the control socket", n)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)


def setup_logging(replica_id: str, *, debug: bool) -> None:
    """Journal with structured fields under systemd (JOURNAL_STREAM set), plain stderr otherwise."""
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger("repld")
    root.setLevel(level)
    if os.environ.get("JOURNAL_STREAM") and _sd_journal is not None:
        handler: logging.Handler = _sd_journal.JournalHandler(
            SYSLOG_IDENTIFIER="repld", REPLICA=replica_id
        )
        one_line([handler], "%(message)s")
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)
        root.addHandler(handler)
        root.propagate = False
    else:
        # Run by hand (a terminal, a log file): with the time, which the journal adds itself.
        one_line(logging.getLogger().handlers,
                 "%(asctime)s.%(msecs)03d " + ("repld: %(levelname)s: %(name)s: %(message)s"
                                               if debug else "repld: %(levelname)s: %(message)s"),
                 "%Y-%m-%d %H:%M:%S")  # fmt: skip
