"""The control socket in a shared place (a trial): another local user must not be able to
put a socket of theirs where `repld status` asks, nor be asked by it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import REPLD, make_replicas, wait_for

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root (to act as another user)")


def test_a_state_directory_too_deep_for_a_socket_address_still_holds_the_socket(tmp_path):
    """A state directory whose control.sock is longer than a Unix socket address (107 bytes):
    the socket stays there, reached through a descriptor of its directory. (It used to go to
    TMPDIR/repld-UID, where a shell's `repld status` did not look when the daemon's TMPDIR, or
    its /tmp under the units' PrivateTmp=, was another: a trial saw exit 3, not running.)"""
    (a,) = make_replicas(tmp_path, "a")
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    text = a.config.read_text()
    state = [ln for ln in text.splitlines() if ln.startswith("state = ")][0]
    os.rename(a.state, deep / "a.state")
    a.config.write_text(text.replace(state, f'state = "{deep / "a.state"}"'))
    sock = deep / "a.state" / "control.sock"
    assert len(os.fsencode(sock)) > 107
    own_tmp = tmp_path / "daemon-tmp"
    own_tmp.mkdir()
    daemon = subprocess.Popen([*REPLD, "--config", a.config, "run"],
                              env={**os.environ, "TMPDIR": str(own_tmp)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: a("status", check=False).returncode == 0, "status to find the daemon")
        assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600
        assert not list(own_tmp.iterdir())  # nothing put in the daemon's TMPDIR
        out = a("status", "--json").stdout
        assert '"state"' in out
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert not sock.exists()  # removed on the way out


def test_status_does_not_ask_a_socket_another_user_serves(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    place = Path(tempfile.mkdtemp(prefix="repld-test-", dir="/tmp"))  # (nobody can reach it)
    place.chmod(0o777)
    path = place / "repld.sock"
    with open(a.config, "a") as f:
        f.write(f'\ncontrol_socket = "{path}"\n')
    fake = (f"import socket, os\ns = socket.socket(socket.AF_UNIX)\ns.bind({str(path)!r})\n"
            "os.chmod(s.getsockname(), 0o666)\ns.listen(1)\nc, _ = s.accept()\n"
            "c.recv(100)\nc.sendall(b'{\"status\": {\"state\": \"FAKE\"}}\\n')\n")  # fmt: skip
    server = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", fake])
    try:
        wait_for(lambda: path.exists(), "the other user's socket")
        proc = a("status", "--json", check=False)
        assert proc.returncode != 0 and "FAKE" not in proc.stdout, proc
        assert "served by another user's process (uid 65534)" in proc.stderr, proc.stderr
    finally:
        server.kill()
        server.wait(timeout=30)
        shutil.rmtree(place)


def test_a_daemon_that_dies_as_it_is_asked_is_not_running(tmp_path):
    """`repld run` right after a kill -9 of the old daemon asks its socket whether one runs:
    the dying daemon reset the connection, and the new one exited with a bare
    "[Errno 104] Connection reset by peer" (a trial). It is "not running" now."""
    import socket as socketmod
    import threading

    (a,) = make_replicas(tmp_path, "a")
    path = Path(tempfile.mkdtemp(prefix="repld-test-", dir="/tmp")) / "repld.sock"
    with open(a.config, "a") as f:
        f.write(f'\ncontrol_socket = "{path}"\n')
    server = socketmod.socket(socketmod.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def die_mid_answer() -> None:
        conn, _ = server.accept()
        wait_for(lambda: conn.recv(1, socketmod.MSG_PEEK), "the request")
        conn.close()  # closed with the request unread: the asker's recv gets ECONNRESET

    t = threading.Thread(target=die_mid_answer)
    t.start()
    try:
        proc = a("status", check=False)
        assert "repld is not running" in proc.stderr, proc.stderr
        assert "Connection reset" not in proc.stderr and "Traceback" not in proc.stderr
    finally:
        t.join(timeout=30)
        server.close()
        shutil.rmtree(path.parent)


def test_status_right_after_the_start_waits_for_the_daemon(tmp_path):
    """A newcomer's trial: `repld run &` then `repld status` at once said "not running ...
    start it" (the daemon answers once it has opened its replica and sockets, a second or so
    later); a second `run` then failed. While a process holds the replica's database, status
    waits for its daemon to answer. With none there, it says so at once."""
    import time

    (a,) = make_replicas(tmp_path, "a")
    start = time.monotonic()
    assert a("status", check=False).returncode == 3
    assert time.monotonic() - start < 4.0  # (nothing holds the database: no wait)
    daemon = subprocess.Popen([*REPLD, "--config", a.config, "run"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: (a.state / "repld.lock").exists() and _locked(a.state / "repld.lock"),
                 "the daemon to open its database")  # fmt: skip
        proc = a("status", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    # A process that holds the database and never answers (a long sync, say): status waits
    # a while for it, then says what it found.
    import fcntl

    fd = os.open(a.state / "repld.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = time.monotonic()
        proc = a("status", check=False)
        assert proc.returncode == 3 and "a repld process holds its database" in proc.stderr
        assert time.monotonic() - start >= 4.0  # (it waited)
    finally:
        os.close(fd)


def _locked(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
