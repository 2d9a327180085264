"""systemd glue, driven for real: the units pass `systemd-analyze verify`; `repld run` speaks the
sd_notify protocol to a NOTIFY_SOCKET the test listens on (READY after the first scan, STATUS lines,
WATCHDOG, RELOADING on SIGHUP, STOPPING); `systemd-socket-activate` hands it its control socket;
another uid is refused on the control socket; config mistakes make `repld run` and `repld status`
exit 2 naming the file and the key.

systemd is not PID 1 here: only its tools are used. Daemons are real subprocesses, stopped by their
PID at the end of each test whatever happens; every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemons import free_port
from helpers import REPLD, Rep, wait_for

UNITS = Path(__file__).resolve().parents[2] / "units"
REPLD_SCRIPT = Path(sys.executable).with_name("repld")  # the venv's console script
NOBODY_UID = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups"]
POLL = 0.05
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
STATUS_LINE = re.compile(r"^(starting|scanning|paused|error|idle|syncing .+ from \S+)"
                         r"; \d+ of \d+ peers connected(; .+)?$")  # fmt: skip


def repld(*args: str | os.PathLike[str], nobody: bool = False) -> subprocess.CompletedProcess[str]:
    """The real command, as root or (``nobody``) as uid 65534; never raises on its exit code."""
    cmd = [*(AS_NOBODY if nobody else []), *REPLD, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")


@dataclass
class Daemon(Rep):
    """A replica with a free port on 127.0.0.1, and its `repld run` process when it runs."""

    port: int = 0
    log: Path = field(default_factory=Path)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def public_key(self) -> str:
        return str(json.loads(self("id", "--json").stdout)["public_key"])

    def set(self, key: str, value: str) -> None:
        """Add a top-level key to the config by editing its TOML text (before any [[peer]])."""
        text = self.config.read_text()
        head, sep, tail = text.partition("\n[[peer]]")
        self.config.write_text(f"{head.rstrip()}\n{key} = {json.dumps(value)}\n{sep}{tail}")

    def start(self, cmd: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        assert self.proc is None
        cmd = cmd or [*REPLD, "--config", str(self.config), "run"]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         env={**os.environ, **(env or {})})  # fmt: skip

    def status(self, *, nobody: bool = False) -> dict[str, Any] | None:
        """`repld status --json`: the daemon's answer, None if none runs (exit 3)."""
        proc = repld("--config", self.config, "status", "--json", nobody=nobody)
        if proc.returncode == 3:
            return None
        assert proc.returncode == 0, f"status exited {proc.returncode}: {proc.stderr}"
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    def wait_idle(self) -> dict[str, Any]:
        def idle() -> dict[str, Any] | None:
            assert self.proc is not None and self.proc.poll() is None, self.describe()
            st = self.status()
            return st if st is not None and st["state"] == "idle" else None

        return wait_for(idle, f"{self.name}'s daemon idle", explain=self.describe)  # type: ignore[no-any-return]

    def stop(self) -> int:
        """SIGTERM to its PID; SIGKILL (and a failure) if it has not exited by the deadline."""
        assert self.proc is not None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"{self.name} ignored SIGTERM\n{self.describe()}") from None
        return proc.returncode

    def describe(self) -> str:
        code = None if self.proc is None else self.proc.poll()
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"{self.name}: exit code {code}; its log:\n{log}"


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """make(name, base=tmp_path) -> an initialised replica; every daemon is stopped at the end."""
    made: list[Daemon] = []

    def _make(name: str, base: Path = tmp_path) -> Daemon:
        root = base / name
        root.mkdir()
        d = Daemon(name, root, base / f"{name}.toml", port=free_port(), log=base / f"{name}.log")
        d("init", root, "--name", name, "--listen", d.endpoint)
        made.append(d)
        return d

    yield _make
    problems = []
    for d in made:
        if d.proc is not None:
            try:
                d.stop()
            except AssertionError as e:  # go on: no daemon may outlive the test
                problems.append(str(e))
        if d.log.exists():
            print(d.describe())
    assert not problems, "\n".join(problems)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's own tmp_path lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="repld-systemd-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


# -- 1. the units ----------------------------------------------------------------------------------


def _verify(unit: Path, env: dict[str, str], *user: str) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", *user, str(unit)], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    out = proc.stdout + proc.stderr
    bad = [line for line in out.splitlines() if re.search("Unknown|Failed|not safe", line)]
    assert proc.returncode == 0 and not bad, f"verify {unit.name} exited {proc.returncode}:\n{out}"


@pytest.mark.parametrize("unit", ["repld.service", "repld.socket"])
def test_user_units_verify(tmp_path, unit):
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "repld").symlink_to(REPLD_SCRIPT)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    _verify(UNITS / unit, env, "--user")


def test_system_template_verifies(tmp_path):
    text = (UNITS / "repld@.service").read_text()
    assert "/usr/local/bin/repld" in text
    instance = tmp_path / "repld@root.service"
    instance.write_text(text.replace("/usr/local/bin/repld", str(REPLD_SCRIPT)))
    _verify(instance, {"PATH": os.environ["PATH"]})


# -- 2. sd_notify ----------------------------------------------------------------------------------


class NotifyListener:
    """The NOTIFY_SOCKET end that systemd would hold: every datagram, parsed, with its time."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[tuple[float, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()

    def expect(self, key: str, timeout: float = START_TIMEOUT) -> tuple[float, dict[str, str]]:
        """The next message (after those already returned) that sets ``key``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} within {timeout:g} s; got: {self.seen[-20:]}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.seen.append((time.monotonic(), msg))
            if key in msg:
                return self.seen[-1]

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.seen if "STATUS" in m]


def test_sd_notify_ready_status_watchdog_reload_stopping(tmp_path, make):
    a, b, c = make("a"), make("b"), make("c")
    a("peer", "add", "b", b.endpoint, b.public_key)
    for i in range(300):  # made after init: only the daemon's first scan can count them
        d = a.root / f"d{i % 10}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n")
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        a.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
        assert a.proc is not None
        t_ready, ready = notify.expect("READY")
        st = a.status()
        assert st is not None and st["state"] == "idle", st
        assert (st["local"]["files"], st["local"]["dirs"]) == (300, 10), st["local"]
        assert ready["READY"] == "1" and ready["MAINPID"] == str(a.proc.pid)
        assert ready["STATUS"] == "idle; 0 of 1 peers connected"
        assert "scanning" in notify.statuses()[:-1], notify.seen  # before READY
        # The first scan asks for start-up time as it goes (a big tree can outlast the start
        # timeout, a trial noted: 9 s here for 2.6 GB changed while stopped).
        assert any("EXTEND_TIMEOUT_USEC" in m for t, m in notify.seen if t <= t_ready), notify.seen

        # WATCHDOG_USEC=1 s: fed every half of it, from the engine loop.
        for _ in range(3):
            notify.expect("WATCHDOG", timeout=max(0.0, t_ready + 3.0 - time.monotonic()))
        dogs = [t for t, m in notify.seen if m.get("WATCHDOG") == "1" and t > t_ready]
        gaps = [round(y - x, 3) for x, y in zip(dogs, dogs[1:], strict=False)]
        # (Each gap under the interval; on average about half of it, not a busy loop. One gap
        # alone may look short: this side reads the socket late when the machine is busy.)
        assert gaps and all(g < 1.0 for g in gaps) and sum(gaps) / len(gaps) >= 0.4, gaps

        # SIGHUP: RELOADING, then READY again, with the peer added meanwhile in effect.
        a("peer", "add", "c", c.endpoint, c.public_key)
        a.proc.send_signal(signal.SIGHUP)
        t_reloading, reloading = notify.expect("RELOADING")
        usec = int(reloading["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 10, reloading
        t_reloaded, reloaded = notify.expect("READY")
        assert t_reloaded >= t_reloading
        assert reloaded["STATUS"] == "idle; 0 of 2 peers connected", reloaded
        st = a.status()
        assert st is not None and sorted(p["name"] for p in st["peers"]) == ["b", "c"], st

        a.proc.send_signal(signal.SIGTERM)
        _, stopping = notify.expect("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert a.proc.wait(timeout=STOP_TIMEOUT) == 0, a.describe()
        bad = [s for s in notify.statuses() if s not in ("scanning", "stopping")
               and not STATUS_LINE.match(s)]  # fmt: skip
        assert not bad, bad
    finally:
        notify.close()


def test_a_notice_systemd_cannot_take_does_not_stop_the_daemon(tmp_path, make):
    """A trial: with systemd-python installed, a notice to a NOTIFY_SOCKET that is gone (or
    refuses, systemd busy) killed the daemon: `repld: [Errno 111] Connection refused`."""
    a = make("a")
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        a.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
        notify.expect("READY")
    finally:
        notify.close()  # gone mid-run: every watchdog notice from now on fails
    notify.path.unlink()
    (a.root / "after.txt").write_text("still watching\n")
    wait_for(lambda: (st := a.status()) is not None and st["local"]["files"] == 1,
             "the daemon to record a file after its notices began to fail", explain=a.describe)
    assert a.proc is not None and a.proc.poll() is None, a.describe()
    a.stop()

    b = make("b")  # a NOTIFY_SOCKET that never was there
    b.start(env={"NOTIFY_SOCKET": str(tmp_path / "nothing-here.sock")})
    wait_for(lambda: (st := b.status()) is not None and st["state"] == "idle",
             "a daemon whose notices all fail to start", explain=b.describe)
    b.stop()


# -- 3. socket activation --------------------------------------------------------------------------


def activate(a: Daemon, sock: Path) -> None:
    """`repld run` under systemd-socket-activate, as repld.socket would start repld.service."""
    a.set("control_socket", str(sock))
    a.start(["systemd-socket-activate", "-l", str(sock), "-E", f"REPLD_CONFIG={a.config}",
             str(REPLD_SCRIPT), "run"])  # fmt: skip
    wait_for(sock.exists, f"{sock} made by systemd-socket-activate", explain=a.describe)


def test_socket_activation_serves_status_on_the_inherited_socket(tmp_path, make):
    a = make("a")
    (a.root / "hello.txt").write_text("hello\n")
    sock = tmp_path / "ctl.sock"
    activate(a, sock)
    assert a.proc is not None
    cmdline = Path(f"/proc/{a.proc.pid}/cmdline")
    assert b"systemd-socket-activate" in cmdline.read_bytes()  # nothing started before a client
    inode = sock.stat().st_ino
    st = a.wait_idle()  # the first connection starts the daemon; it answers once it has scanned
    assert st["root"] == str(a.root) and st["local"]["files"] == 1, st
    assert cmdline.read_bytes().split(b"\0")[-2:] == [b"run", b""]  # the same PID is repld now
    assert sock.stat().st_ino == inode, "the daemon bound a socket of its own instead"
    assert a.stop() == 0, a.describe()
    assert sock.exists(), "the daemon removed the socket systemd owns"


# -- 4. the control socket serves its owner only ---------------------------------------------------


@pytest.fixture(params=["own-socket", "socket-activated"])
def reachable_by_nobody(request, make, open_tmp) -> Daemon:
    """A running daemon whose control socket uid 65534 can reach: only SO_PEERCRED can refuse."""
    a = make("a", open_tmp)
    a.config.chmod(0o644)  # so that nobody's `repld status` finds the socket's path
    if request.param == "own-socket":
        a.start()
        a.wait_idle()
        sock = a.state / "control.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        refused = repld("--config", a.config, "status", nobody=True)
        assert refused.returncode != 0, refused  # the file mode alone refuses
        a.state.chmod(0o711)
    else:
        sock = open_tmp / "ctl.sock"
        activate(a, sock)
        a.wait_idle()
    sock.chmod(0o666)
    return a


def test_another_uid_is_refused_and_the_owner_still_served(reachable_by_nobody):
    a = reachable_by_nobody
    proc = repld("--config", a.config, "status", "--json", nobody=True)
    assert proc.returncode not in (0, 3), proc
    assert proc.stdout == ""
    wait_for(lambda: f"refused a request from uid {NOBODY_UID}" in a.log.read_text(),
             "the daemon to log the refusal", explain=a.describe)  # fmt: skip
    assert a.proc is not None and a.proc.poll() is None, a.describe()
    st = a.status()
    assert st is not None and st["state"] == "idle"


def test_a_refused_uid_is_told_why_every_time(reachable_by_nobody):
    a = reachable_by_nobody
    results = [repld("--config", a.config, "status", nobody=True) for _ in range(30)]
    silent = [(r.returncode, r.stderr) for r in results
              if r.returncode == 0 or "may not use this daemon" not in r.stderr]  # fmt: skip
    assert not silent, f"{len(silent)} of 30 refusals without the reason: {silent}"
    assert a.status() is not None


# -- 5. config mistakes, as `repld run` and `repld status` meet them -------------------------------
# test_cli.py covers unknown keys, a bad listen endpoint, a bad conflict_policy and
# a missing key (through `repld id`, which loads the config the same way); what it does not cover:

PEER = "\n[[peer]]\nname = 'b'\nendpoint = '{endpoint}'\npublic_key = '{key}'\n"
KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


@pytest.mark.parametrize("command", ["run", "status"])
@pytest.mark.parametrize("extra,expect", [
    ("scan_interval = = 60\n", ["not valid TOML", "line 5"]),
    (PEER.format(endpoint="tcp://h", key=KEY), ["'peer[0].endpoint'", "bad endpoint 'tcp://h'"]),
    (PEER.format(endpoint="tcp://h:1", key="short"), ["'peer[0].public_key'", "bad public key"]),
    ("control_socket = 7437\n", ["'control_socket'", "a path"]),
], ids=["toml-line", "peer-endpoint", "peer-public-key", "control-socket-not-a-path"])
def test_config_mistakes_exit_2_naming_file_and_key(make, command, extra, expect):
    a = make("a")
    text = "\n".join(line for line in a.config.read_text().splitlines()
                     if line.split(" = ")[0] in ("root", "state", "name", "listen"))  # fmt: skip
    a.config.write_text(text + "\n" + extra)
    proc = repld("--config", a.config, command)
    assert proc.returncode == 2, proc
    for part in [str(a.config), *expect]:
        assert part in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (a.state / "control.sock").exists()


def test_unreadable_secret_key_exits_2(open_tmp):
    """chmod 000 does not stop root from reading: the replica is nobody's, and so is the daemon."""
    home = open_tmp / "nobody"
    for d in (home, home / "a"):
        d.mkdir()
        os.chown(d, NOBODY_UID, NOBODY_UID)
    port = free_port()
    proc = repld("--config", home / "a.toml", "init", home / "a", "--name", "a",
                 "--listen", f"tcp://127.0.0.1:{port}", nobody=True)  # fmt: skip
    assert proc.returncode == 0, proc
    secret = home / "a.state" / "keys" / "curve.secret"
    secret.chmod(0)
    proc = repld("--config", home / "a.toml", "run", nobody=True)
    assert proc.returncode == 2, proc
    for part in [str(home / "a.toml"), "'state'", str(secret), "Permission denied"]:
        assert part in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
