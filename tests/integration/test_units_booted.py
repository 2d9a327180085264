"""The shipped units under a real systemd as PID 1, with every hardening option in force.

`systemd-analyze verify` (test_systemd.py) only reads the units; this boots a container
(`systemd-nspawn`, Debian's systemd-container) whose root is a throw-away overlay of this machine's
own root file system, with a private network namespace, installs the units there as a user would,
and checks what a user would: `systemctl start` returns once the daemon is ready, files replicate
between two users' services over CurveZMQ on the container's loopback, the sandbox really is in
force on the running process (read-only system, writable home, no privileges, seccomp),
`systemctl reload` applies a new peer, a crash is restarted, `systemctl stop` is a clean exit, the
journal gets structured fields, and the user unit is started by its socket on the first
`repld status`.

Needs root (mounts, nspawn). Skipped, with the reason, where a container cannot boot.
Everything started here is stopped by PID: the container is powered off, and its nspawn process
is signalled by its PID if that does not end it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units"
BOOT_TIMEOUT = 90.0
HAVE_JOURNAL = importlib.util.find_spec("systemd") is not None
WAIT_ONLINE = ("systemd-networkd-wait-online.service", "NetworkManager-wait-online.service",
               "ifupdown-wait-online.service")  # fmt: skip
POLL = 0.05

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
    reason="needs root and systemd-nspawn (Debian package systemd-container)",
)


@dataclass
class Machine:
    """A booted container: its root as seen from here, and the PID of its systemd."""

    root: Path
    leader: int

    def sh(self, script: str, *, check: bool = True, timeout: float = 60) -> str:
        """Run a bash script inside the container as root; its stdout (stderr kept for failures)."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "bash", "-euo", "pipefail", "-s"],
            input=script, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"in the container, exit {proc.returncode}:\n{script}\n"
                                 f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")  # fmt: skip
        return proc.stdout

    def as_user(self, user: str, command: str, *, check: bool = True) -> str:
        uid = self.uid(user)
        return self.sh(
            f"runuser -u {user} -- env XDG_RUNTIME_DIR=/run/user/{uid} "
            f"bash -euo pipefail -c {shlex.quote(command)}",
            check=check,
        )

    def uid(self, user: str) -> int:
        return int(self.sh(f"id -u {user}").strip())

    def show(self, unit: str, prop: str, *, user: str | None = None) -> str:
        cmd = f"systemctl show -p {prop} --value {unit}"
        if user:
            return self.as_user(user, cmd.replace("systemctl", "systemctl --user")).strip()
        return self.sh(cmd).strip()

    def home(self, user: str) -> Path:
        return self.root / "home" / user

    def journal(self, unit: str) -> list[dict[str, Any]]:
        out = self.sh(f"journalctl --no-pager -o json -u {unit}")
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass  # the process or one of its threads is gone
    return found


def _install_repld(root: Path, prefix: Path) -> Path:
    """A venv at ``prefix`` in the container holding repld (copied from this checkout) and what
    it runs on (copied from this venv); its ``repld`` script, as the container sees it.

    Not this venv itself: a checkout under /tmp (a CI clone) is hidden from the services by
    PrivateTmp=, as it would be on any machine."""
    venv = root / prefix.relative_to("/")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)],
                   check=True, capture_output=True)  # fmt: skip
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    needed = [r for r in importlib.metadata.requires("repld") or [] if "extra ==" not in r]
    names = [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in needed]
    if HAVE_JOURNAL:
        names.append("systemd-python")  # optional: the journal's structured fields
    for name in names:
        dist = importlib.metadata.distribution(name)
        for f in dist.files or []:
            src = Path(str(dist.locate_file(f)))
            if str(f).startswith("..") or not src.is_file():
                continue  # scripts outside site-packages; caches
            (site / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, site / f)
    for package in ("daemon", "protocol", "etc"):  # the package-dir mapping of pyproject.toml
        shutil.copytree(REPO / package, site / "repld" / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    script = venv / "bin" / "repld"
    script.write_text(f"#!{prefix}/bin/python\nimport sys\nfrom repld.daemon.cli import main\n"
                      "sys.exit(main())\n")  # fmt: skip
    script.chmod(0o755)
    return prefix / "bin" / "repld"


def _readable_by_all(root: Path, path: Path) -> None:
    """Let every user of the container reach ``path`` (the venv, the Python it links to):
    give o+x to its ancestors in the overlay only, never on this machine."""
    for d in [*reversed(path.parents), path]:
        inside = root / d.relative_to("/")
        if inside.is_dir() and not inside.is_symlink():
            mode = stat.S_IMODE(inside.stat().st_mode)
            if not mode & 0o001:
                os.chmod(inside, mode | 0o005)


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    base = Path(tempfile.mkdtemp(prefix="repld-boot-"))
    up, root = base / "up", base / "root"
    up.mkdir()
    root.mkdir()
    mounted: list[Path] = []
    nspawn: subprocess.Popen[bytes] | None = None
    log = base / "boot.log"
    try:
        try:
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", up], check=True, capture_output=True)
            mounted.append(up)
            (up / "u").mkdir()
            (up / "w").mkdir()
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir=/,upperdir={up / 'u'},workdir={up / 'w'}", root],
                           check=True, capture_output=True)  # fmt: skip
            mounted.append(root)
        except subprocess.CalledProcessError as e:
            pytest.skip(
                f"cannot make an overlay of / for the container: {e.stderr.decode().strip()}"
            )
        binds = []
        python = Path(os.path.realpath(sys.executable))
        if not (root / python.relative_to("/")).exists():  # on another file system
            binds.append(f"--bind-ro={python.parent}")
        _readable_by_all(root, python.parent)
        # Install as the units' comments tell a user to: repld on the PATH, the template in
        # /etc/systemd/system, the user unit and its socket in /etc/systemd/user.
        local_bin = root / "usr/local/bin"
        local_bin.mkdir(parents=True, exist_ok=True)
        (local_bin / "repld").unlink(missing_ok=True)
        (local_bin / "repld").symlink_to(_install_repld(root, Path("/opt/repld")))
        shutil.copy(UNITS / "repld@.service", root / "etc/systemd/system/repld@.service")
        user_units = root / "etc/systemd/user"
        user_units.mkdir(parents=True, exist_ok=True)
        for unit in ("repld.service", "repld.socket"):
            (user_units / unit).unlink(missing_ok=True)
            shutil.copy(UNITS / unit, user_units / unit)
        # The container has only a loopback interface: a host's "wait until online" service
        # would hold its boot for minutes. And a machine id of its own, so its journal is its own.
        for unit in WAIT_ONLINE:
            mask = root / "etc/systemd/system" / unit
            mask.unlink(missing_ok=True)
            mask.symlink_to("/dev/null")
        (root / "etc/machine-id").unlink(missing_ok=True)
        (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        with open(log, "wb") as out:
            nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(root), "--register=no", "--keep-unit", "-q",
                 "--private-network", "-M", f"repld-test-{os.getpid()}", "--console=pipe",
                 *binds, "-b"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        ns = nspawn

        def leader() -> int | None:
            if ns.poll() is not None:
                pytest.skip(f"the container did not boot (systemd-nspawn exited {ns.returncode}):\n"
                            f"{log.read_text(errors='replace')[-2000:]}")  # fmt: skip
            for k in _children(ns.pid):
                try:
                    if Path(f"/proc/{k}/comm").read_text().strip() == "systemd":
                        return k
                except OSError:
                    pass  # gone, or not yet the container's init
            return None

        pid = wait_for(leader, "the container's systemd", timeout=BOOT_TIMEOUT,
                       explain=lambda: log.read_text(errors="replace"))  # fmt: skip
        m = Machine(root, pid)
        # Until its manager has made its socket, systemctl cannot ask; then --wait waits for
        # the boot to end.
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            try:
                state = m.sh("systemctl is-system-running --wait 2>&1 || true",
                             timeout=max(1.0, deadline - time.monotonic()))  # fmt: skip
            except subprocess.TimeoutExpired:
                state = f"still booting after {BOOT_TIMEOUT:g} s"
            if state.strip() in ("running", "degraded") or time.monotonic() > deadline:
                break
            time.sleep(POLL)
        if state.strip() not in ("running", "degraded"):
            jobs = m.sh("systemctl list-jobs --no-pager 2>&1 | head -20 || true", check=False)
            pytest.skip(f"the container's systemd did not finish booting: {state.strip()}\n{jobs}")
        yield m
    finally:
        # Each step on its own: whatever fails, the container is stopped and nothing stays mounted.
        if nspawn is not None:
            _power_off(nspawn)
        for path in reversed(mounted):
            if subprocess.run(["umount", path], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", path], capture_output=True)
        if not mounted or not os.path.ismount(root):
            shutil.rmtree(base, ignore_errors=True)


def _power_off(nspawn: subprocess.Popen[bytes]) -> None:
    """Halt the container; if it does not go, signal its nspawn process by PID."""
    try:
        for pid in _children(nspawn.pid) if nspawn.poll() is None else []:
            subprocess.run(["nsenter", "-t", str(pid), "-a", "systemctl", "poweroff"],
                           capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pass  # then the signals below
    for sig in (None, signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and nspawn.poll() is None:
            nspawn.send_signal(sig)
        try:
            nspawn.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def pair(m: Machine, a: str, b: str, *, ports: tuple[int, int], new_tree: bool = True) -> None:
    """``repld init`` both homes as one tree, listening on the container's loopback; each adds
    the other as a peer."""
    m.sh(f"id {a} >/dev/null 2>&1 || useradd -m {a}; id {b} >/dev/null 2>&1 || useradd -m {b}")
    m.as_user(a, f"repld init ~ --name {a} --listen tcp://127.0.0.1:{ports[0]}")
    tree = json.loads(m.as_user(a, "repld id --json"))["tree_id"]
    m.as_user(b, f"repld init ~ --name {b} --listen tcp://127.0.0.1:{ports[1]} --tree-id {tree}")
    key_a = json.loads(m.as_user(a, "repld id --json"))["public_key"]
    key_b = json.loads(m.as_user(b, "repld id --json"))["public_key"]
    m.as_user(a, f"repld peer add {b} tcp://127.0.0.1:{ports[1]} {shlex.quote(key_b)}")
    m.as_user(b, f"repld peer add {a} tcp://127.0.0.1:{ports[0]} {shlex.quote(key_a)}")


def arrived(path: Path, content: bytes) -> bool:
    try:
        return path.read_bytes() == content
    except OSError:
        return False


def process_status(m: Machine, pid: str) -> dict[str, str]:
    lines = m.sh(f"cat /proc/{pid}/status").splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def sandboxed(home: str) -> list[str]:
    return [f"{d} Read-only file system" for d in ("/usr", "/etc", "/var/lib")] + [
        f"{home} writable"
    ]


def sandbox_probe(m: Machine, pid: str, home: str) -> list[str]:
    """Root inside the daemon's own mount namespace tries to write: only the mounts can refuse
    it (EROFS), not the file modes."""
    out = m.sh(
        f"for d in /usr /etc /var/lib {home}; do"
        f" if out=$(nsenter -t {pid} -m touch $d/.repld-probe 2>&1); then echo $d writable;"
        f" else echo $d ${{out##*: }}; fi; done;"
        f" nsenter -t {pid} -m rm -f {home}/.repld-probe"
    )
    return out.splitlines()


def test_system_template_runs_sandboxed_and_replicates(machine: Machine) -> None:
    m = machine
    pair(m, "alice", "bob", ports=(7501, 7502))
    # Type=notify: `systemctl start` comes back only once repld said READY=1 (listening, scanned).
    m.sh("systemctl start repld@alice.service repld@bob.service")
    for user in ("alice", "bob"):
        assert m.show(f"repld@{user}", "ActiveState") == "active"
        assert m.show(f"repld@{user}", "StatusText").startswith(("idle", "syncing", "scanning"))

    # A file and an executable written by alice appear, identical, in bob's home; and back.
    m.as_user(
        "alice",
        "mkdir -p ~/docs && printf 'from alice\\n' > ~/docs/note.txt && "
        "printf '#!/bin/sh\\n' > ~/docs/run.sh && chmod 755 ~/docs/run.sh",
    )
    wait_for(lambda: arrived(m.home("bob") / "docs/run.sh", b"#!/bin/sh\n"), "alice's files at bob",
             explain=lambda: m.sh("journalctl --no-pager -u 'repld@*' | tail -30"))  # fmt: skip
    assert (m.home("bob") / "docs/note.txt").read_bytes() == b"from alice\n"
    assert stat.S_IMODE((m.home("bob") / "docs/run.sh").stat().st_mode) == 0o755
    m.as_user("bob", "printf 'reply\\n' > ~/docs/reply.txt")
    wait_for(
        lambda: arrived(m.home("alice") / "docs/reply.txt", b"reply\n"), "bob's reply at alice"
    )
    status = json.loads(m.as_user("alice", "repld status --json"))
    assert status["peers"][0]["connected"] is True

    # The sandbox is in force on the running daemon, not just written in the unit.
    pid = m.show("repld@alice", "MainPID")
    proc = process_status(m, pid)
    assert proc["NoNewPrivs"].strip() == "1"
    assert int(proc["CapBnd"], 16) == 0 and int(proc["CapEff"], 16) == 0
    assert proc["Seccomp"].strip() == "2"
    assert sandbox_probe(m, pid, "/home/alice") == sandboxed("/home/alice")

    # systemd's own rating of the sandbox: "OK" or better (it rates 0 safe to 10 exposed).
    rating = m.sh("systemd-analyze security --no-pager repld@alice.service | tail -1")
    exposure = float(rating.split(":")[1].split()[0])
    assert exposure < 4.0, rating

    # The journal gets structured fields (with systemd-python, which ./dev installs).
    entries = m.journal("repld@alice.service")
    if HAVE_JOURNAL:
        replica = json.loads(m.as_user("alice", "repld id --json"))["replica_id"]
        assert any(e.get("REPLICA") == replica for e in entries)
        assert any(e.get("PEER") == "bob" for e in entries), [e.get("MESSAGE") for e in entries]

    # Reload: the daemon stays up, same process, and says it re-read its config.
    m.sh("systemctl reload repld@alice")
    assert m.show("repld@alice", "MainPID") == pid

    def reloaded() -> bool:
        return any("config reloaded" in str(e.get("MESSAGE")) for e in m.journal("repld@alice"))

    wait_for(reloaded, "the reload in the journal")

    # A crash is restarted (Restart=on-failure after RestartSec), and it catches up.
    m.sh(f"kill -KILL {pid}")
    wait_for(lambda: m.show("repld@alice", "NRestarts") == "1", "systemd to restart repld@alice",
             timeout=60)  # fmt: skip
    wait_for(lambda: m.show("repld@alice", "ActiveState") == "active", "repld@alice active again",
             timeout=60)  # fmt: skip
    m.as_user("bob", "printf 'while alice was down\\n' > ~/docs/later.txt")
    wait_for(lambda: arrived(m.home("alice") / "docs/later.txt", b"while alice was down\n"),
             "bob's new file at the restarted alice")  # fmt: skip

    # Stop is a clean exit on SIGTERM, well within TimeoutStopSec.
    m.sh("systemctl stop repld@alice repld@bob")
    for user in ("alice", "bob"):
        assert m.show(f"repld@{user}", "ActiveState") == "inactive"
        assert m.show(f"repld@{user}", "Result") == "success"
        assert m.show(f"repld@{user}", "ExecMainStatus") == "0"


def test_user_unit_is_started_by_its_socket_and_takes_a_new_peer_on_reload(
    machine: Machine,
) -> None:
    m = machine
    pair(m, "carol", "dave", ports=(7511, 7512))
    uid = m.uid("carol")
    sock = f"/run/user/{uid}/repld.sock"
    # As README says: repld in ~/.local/bin, the control socket where repld.socket makes it.
    m.as_user("carol", "mkdir -p ~/.local/bin && ln -s /usr/local/bin/repld ~/.local/bin/repld")
    m.as_user("carol", f"sed -i 's|^# control_socket = .*|control_socket = \"{sock}\"|'"
                       " ~/.config/repld/config.toml")  # fmt: skip
    m.sh(f"systemctl start user@{uid}.service")
    user_ctl = "systemctl --user"
    m.as_user("carol", f"{user_ctl} daemon-reload && {user_ctl} start repld.socket")
    assert m.show("repld.service", "ActiveState", user="carol") == "inactive"

    # The first `repld status` reaches the socket systemd holds, and that starts the daemon.
    # (Asked again if the first start under load takes longer than the CLI waits.)
    def status() -> str:
        proc = m.as_user("carol", "repld status 2>&1", check=False)
        return proc if proc.startswith("carol (") else ""

    wait_for(status, "an answer to repld status through repld.socket", timeout=60,
             explain=lambda: m.sh("journalctl --no-pager | tail -40"))  # fmt: skip
    wait_for(lambda: m.show("repld.service", "ActiveState", user="carol") == "active",
             "the socket-started repld.service to be active")  # fmt: skip
    pid = m.show("repld.service", "MainPID", user="carol")
    assert process_status(m, pid)["NoNewPrivs"].strip() == "1"
    # (Without PrivateUsers= in the user unit, this is where it failed: the options were ignored.)
    assert sandbox_probe(m, pid, "/home/carol") == sandboxed("/home/carol")

    # dave runs the system template; carol's service replicates to it.
    m.sh("systemctl start repld@dave.service")
    m.as_user("carol", "printf 'from carol\\n' > ~/hello.txt")
    wait_for(lambda: arrived(m.home("dave") / "hello.txt", b"from carol\n"), "carol's file at dave",
             explain=lambda: m.sh("journalctl --no-pager | tail -30"))  # fmt: skip

    # A third replica, erin, is paired with carol only; `systemctl --user reload` brings it in.
    m.sh("id erin >/dev/null 2>&1 || useradd -m erin")
    tree = json.loads(m.as_user("carol", "repld id --json"))["tree_id"]
    m.as_user("erin", f"repld init ~ --name erin --listen tcp://127.0.0.1:7513 --tree-id {tree}")
    key_c = json.loads(m.as_user("carol", "repld id --json"))["public_key"]
    key_e = json.loads(m.as_user("erin", "repld id --json"))["public_key"]
    m.as_user("erin", f"repld peer add carol tcp://127.0.0.1:7511 {shlex.quote(key_c)}")
    m.sh("systemctl start repld@erin.service")
    m.as_user("carol", f"repld peer add erin tcp://127.0.0.1:7513 {shlex.quote(key_e)}")
    m.as_user("carol", f"{user_ctl} reload repld.service")
    assert m.show("repld.service", "MainPID", user="carol") == pid
    wait_for(lambda: arrived(m.home("erin") / "hello.txt", b"from carol\n"),
             "carol's file at erin, a peer added by reload")  # fmt: skip
    status = json.loads(m.as_user("carol", "repld status --json"))
    assert {p["name"] for p in status["peers"]} == {"dave", "erin"}

    m.as_user("carol", f"{user_ctl} stop repld.service repld.socket")
    assert m.show("repld.service", "Result", user="carol") == "success"
    m.sh("systemctl stop repld@dave repld@erin")
