"""The control socket: how `repld status`, `pause`, `resume` and `rescan` reach the daemon.

A Unix stream socket, one per replica: by default ``control.sock`` in the replica's state
directory (so replicas with different configs never clash, and it works where
``$XDG_RUNTIME_DIR`` is unset), created owner-only; every connection's peer uid is checked with
``SO_PEERCRED`` and only the daemon's own user is served. One request per connection: a JSON
object on one line (``{"cmd": "status"}``), answered by one JSON line. The server is a thread of
its own: it answers ``status`` from the snapshot the engine publishes, and hands every other
command to the engine's queue, so it never touches the database.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import config as configmod
from .config import Config
from .errors import DaemonNotRunning, ReplError
from .store import Store

log = logging.getLogger(__name__)

COMMANDS = ("status", "peers", "conflicts", "rescan", "rescan-full", "accept-root",
            "accept-deletes", "pause",
            "resume", "sync-now", "reload", "prune")
MAX_REQUEST = 64 * 1024
_UNIX_PATH_MAX = 107


def control_path(cfg: Config) -> Path:
    """Where the daemon of ``cfg``'s replica listens: the config's ``control_socket``, else
    ``control.sock`` in the state directory, however long its path (see ``_address``)."""
    if cfg.control_socket is not None:
        return cfg.control_socket
    return cfg.state / "control.sock"


@contextmanager
def _address(path: Path) -> Iterator[str]:
    """An address for the socket at ``path`` that fits in a Unix socket address (107 bytes):
    the path itself, or, when longer, the same file reached through a descriptor of its
    directory (``/proc/self/fd/N/control.sock``). So the socket stays where its replica's state
    is, whatever that path's length; a fallback elsewhere (a directory under $TMPDIR, as
    before) was not where a shell's `repld status` looked when the daemon's /tmp was its own
    (the units' PrivateTmp=) or its TMPDIR another."""
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        yield str(path)
        return
    # (A directory that is not there raises FileNotFoundError, as connecting to a missing
    # socket does: no daemon.)
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    def __init__(
        self,
        path: Path,
        status: Callable[[], dict[str, Any]],
        command: Callable[..., None],
        *,
        conflicts: Callable[[], list[dict[str, Any]]] | None = None,
        inherited: socket.socket | None = None,
    ):
        self.path = path
        self.status = status
        self.command = command
        self.conflicts = conflicts
        self._sock = inherited
        self._owns_path = inherited is None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._sock is None:
            self._sock = self._bind()
        self._sock.settimeout(0.5)
        self._thread = threading.Thread(target=self._serve, name="repld-control", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists() or self.path.is_symlink():
            # The database lock says no other daemon runs for this replica: it is stale.
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            with _address(self.path) as address:
                sock.bind(address)
        except OSError as e:
            sock.close()
            raise ReplError(f"cannot create the control socket {self.path}: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        return sock

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        if self._owns_path:
            try:
                self.path.unlink()
            except OSError:
                pass

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("control socket: %s", e)
                continue
            with conn:
                try:
                    self._one(conn)
                except OSError as e:
                    log.debug("control client went away: %s", e)

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        uid = peer_uid(conn)
        # Read the request even when refusing it: closing with unread data would reset the
        # connection and the client would never see why.
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        if uid != os.getuid():
            log.warning("control socket: refused a request from uid %d", uid)
            conn.sendall(_line({"ok": False, "error": f"uid {uid} may not use this daemon"}))
            return
        try:
            req = json.loads(data)
            cmd = req["cmd"]
        except (ValueError, KeyError, TypeError):
            conn.sendall(
                _line({"ok": False, "error": 'expected one JSON line like {"cmd": "status"}'})
            )
            return
        if cmd == "status":
            conn.sendall(_line({"ok": True, "status": self.status()}))
        elif cmd == "peers":
            conn.sendall(_line({"ok": True, "peers": self.status().get("peers", [])}))
        elif cmd == "conflicts" and self.conflicts is not None:
            conn.sendall(_line({"ok": True, "conflicts": self.conflicts()}))
        elif cmd == "prune":
            forget = req.get("forget", [])
            if not isinstance(forget, list) or not all(isinstance(f, str) for f in forget):
                conn.sendall(_line({"ok": False, "error": "forget: expected a list of ids"}))
                return
            self.command(cmd, forget=forget)
            conn.sendall(_line({"ok": True}))
        elif cmd in COMMANDS:
            self.command(cmd)
            conn.sendall(_line({"ok": True}))
        else:
            conn.sendall(_line({"ok": False, "error": f"unknown command {cmd!r:.40}"}))


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def iso_time(wall: float) -> str:
    """A time (seconds since the epoch) as status and reports show it: local ISO 8601 with its
    offset, to the second."""
    return dt.datetime.fromtimestamp(wall).astimezone().isoformat(timespec="seconds")


def replica_error(status: dict[str, Any]) -> str | None:
    """A status's error about the replica as a whole (its root), not about one path: the one
    whose path is ""."""
    return next((e["error"] for e in status["errors"] if not e["path"]), None)


def request(cfg: Config, cmd: str, *, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
    """Send one command to the daemon of ``cfg``'s replica (with ``fields``, for the commands
    that take some: ``prune``'s ``forget``); its reply.

    A daemon just started answers only once it has opened its replica and its sockets (a
    second or so): while some process holds the replica's database, the request waits for a
    daemon to answer, up to STARTING_WAIT (`repld run &` then `repld status` at once said
    "not running; start it", and a second `run` then failed)."""
    deadline = time.monotonic() + min(timeout, STARTING_WAIT)
    while True:
        try:
            return _request(cfg, cmd, timeout=timeout, **fields)
        except DaemonNotRunning as e:
            if not Store.held_elsewhere(cfg.db_path):
                raise
            if time.monotonic() >= deadline:
                raise DaemonNotRunning(
                    f"{e}; a repld process holds its database, though: a sync or a scan, or "
                    "a daemon that is slow to start (its log says why)"
                ) from None
            time.sleep(0.05)


STARTING_WAIT = 5.0  # s: see request


def _request(cfg: Config, cmd: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
    path = control_path(cfg)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    repld = configmod.command_for(cfg)
    start = "`repld run` or `systemctl --user start repld`" if repld == "repld" else f"`{repld} run`"
    not_running = DaemonNotRunning(
        f"repld is not running for {cfg.root} (no daemon at {path}); start it with {start}"
    )
    try:
        try:
            with _address(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            raise not_running from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise not_running from None
            raise ReplError(f"cannot reach the daemon at {path}: {e.strerror}") from None
        if (uid := peer_uid(sock)) not in (os.getuid(), 0):
            raise ReplError(f"the control socket {path} is served by another user's process "
                            f"(uid {uid}), not this replica's daemon: not asked. Remove it, or "
                            "set control_socket in the config")  # fmt: skip
        try:
            sock.sendall(_line({"cmd": cmd, **fields}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed already (a refusal): read what it said
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                # The daemon died as it was asked (a kill -9 a moment before): none answers.
                raise not_running from None
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ReplError(
            f"the daemon at {path} did not answer within {timeout:g} s; if systemd starts it, "
            "`systemctl --user status repld` (or `systemctl status repld@USER` for the system "
            "service) and journalctl say why it did not start"
        ) from None
    finally:
        sock.close()
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ReplError(f"the daemon at {path} sent a reply that is not JSON") from None
    if not reply.get("ok"):
        raise ReplError(f"the daemon refused: {reply.get('error', 'no reason given')}")
    return reply
