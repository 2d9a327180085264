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


def test_a_fallback_socket_directory_made_by_someone_else_is_refused(tmp_path):
    """A state directory whose control.sock would be too long a Unix socket address puts the
    socket in TMPDIR/repld-UID: made first by another user, it is refused, with what to do."""
    (a,) = make_replicas(tmp_path, "a")
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    text = a.config.read_text()
    state = [ln for ln in text.splitlines() if ln.startswith("state = ")][0]
    os.rename(a.state, deep / "a.state")
    a.config.write_text(text.replace(state, f'state = "{deep / "a.state"}"'))
    shared = tmp_path / "tmp"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)
    taken = shared / f"repld-{os.getuid()}"
    taken.mkdir()  # as another user would have made it (nobody can't reach tmp_path itself)
    os.chown(taken, NOBODY, NOBODY)
    taken.chmod(0o777)
    env = {**os.environ, "TMPDIR": str(shared)}
    proc = subprocess.run([*REPLD, "--config", a.config, "run"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0, proc
    assert f"{taken} (for the control socket) belongs to another user" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


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
