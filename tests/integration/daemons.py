"""Real `repld run` daemons on loopback: N replicas of one tree, wired as peers, for tests.

``Cluster`` makes the replicas in a temporary directory (roots, configs and state directories
side by side, so the state never lies inside a root), picks free ports on 127.0.0.1, adds the
peers (a full mesh, or the pairs given), starts and stops the daemons as subprocesses and always
cleans them up. Each daemon's stderr goes to a log file, printed when the cluster closes (pytest
shows it for failed tests). ``wait_until`` polls a condition against a deadline and, when it
runs out, fails with the trees' differences and every running daemon's status.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import REPLD, Rep, snapshot
from repld.daemon import config as configmod
from repld.daemon import control
from repld.daemon.errors import DaemonNotRunning

POLL = 0.05
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, found by binding it, and never
    handed out before in this test run (two replicas set up before either daemon starts would
    otherwise both find the same port free).

    Below the kernel's ephemeral range when it can be: a daemon restarted on its old port must not
    find it taken by an outgoing connection (the peers keep dialling it while it is down)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = random.sample(range(low - 8000, low), 200) if low > 10000 else []
    for port in [*candidates, 0]:  # 0: the kernel picks one
        if port in _HANDED_OUT:
            continue  # free now, but another replica of this run was given it to listen on
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise AssertionError("no free TCP port on 127.0.0.1")


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """What the tests compare: paths, kinds, content, mode bits, symlink targets and (the
    applier gives every file its origin's mtime) file mtimes."""
    return snapshot(root)


def tree_diff(left: dict[str, tuple[object, ...]], right: dict[str, tuple[object, ...]],
              names: tuple[str, str]) -> list[str]:  # fmt: skip
    lines = []
    for path in sorted(left.keys() | right.keys()):
        a, b = left.get(path), right.get(path)
        if a != b:
            lines.append(f"  {path!r}: {names[0]}={a} {names[1]}={b}")
    return lines


@dataclass
class Replica(Rep):
    port: int = 0
    log: Path = field(default_factory=Path)
    proc: subprocess.Popen[bytes] | None = None
    ident: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def public_key(self) -> str:
        return str(self.ident["public_key"])

    @property
    def replica_id(self) -> str:
        return str(self.ident["replica_id"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def add_peer(self, other: Replica) -> None:
        self.add_peer_key(other.name, other.endpoint, other.public_key)

    def add_peer_key(self, name: str, endpoint: str, key: str) -> None:
        # "--": a Z85 key may start with "-" (see test_peer_key_starting_with_a_dash).
        self("peer", "add", "--", name, endpoint, key)

    def start(self, *, wait: bool = True, wrap: Sequence[str] = ()) -> None:
        """Start ``repld run`` (through ``wrap``, a command that execs its arguments, if given)."""
        assert not self.running, f"{self.name} runs already"
        with open(self.log, "ab") as err:
            err.write(f"--- repld run ({time.strftime('%H:%M:%S')}) ---\n".encode())
            err.flush()
            cmd = [*wrap, *REPLD, "--config", str(self.config), "run"]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until the daemon answers on its control socket and has done its first scan."""
        deadline = time.monotonic() + START_TIMEOUT
        while (st := self.status()) is None or st["state"] in ("starting", "scanning"):
            if not self.running:
                code = self.proc.returncode if self.proc is not None else None
                raise AssertionError(f"{self.name}'s daemon exited {code}\n"
                                     + self.log.read_text(errors="replace"))  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}'s daemon not ready within {START_TIMEOUT:g} s\n"
                                     + self.log.read_text(errors="replace"))  # fmt: skip
            time.sleep(POLL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited by the deadline."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(
                    f"{self.name}'s daemon ignored SIGTERM for {STOP_TIMEOUT:g} s"
                ) from None
        self.proc = None

    def kill(self) -> None:
        """kill -9, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None

    def status(self) -> dict[str, Any] | None:
        """The daemon's `status --json` (over its control socket), None if it does not answer."""
        try:
            reply = control.request(configmod.load(self.config, need_root=False), "status", timeout=5.0)
        except DaemonNotRunning:
            return None
        return reply["status"]  # type: ignore[no-any-return]

    def peer_status(self, name: str) -> dict[str, Any] | None:
        st = self.status()
        if st is None:
            return None
        return next(p for p in st["peers"] if p["name"] == name)

    def tree(self) -> dict[str, tuple[object, ...]]:
        return tree(self.root)


class Cluster:
    """Replicas of one tree in ``tmp``; use as a context manager so daemons never outlive a test."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.replicas: list[Replica] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    # -- making replicas -------------------------------------------------------------------------

    def add(self, name: str, *, tree_id: str | None = None, new_tree: bool = False) -> Replica:
        """A new replica: of this cluster's tree (the first replica's), or of a new tree."""
        root = self.tmp / name
        root.mkdir(exist_ok=True)
        rep = Replica(name, root, self.tmp / f"{name}.toml", port=free_port(),
                      log=self.tmp / f"{name}.log")  # fmt: skip
        args: list[str | os.PathLike[str]] = ["init", root, "--name", name]
        args += ["--listen", rep.endpoint]
        if tree_id is None and self.replicas and not new_tree:
            tree_id = self.replicas[0].ident["tree_id"]
        if tree_id:
            args += ["--tree-id", tree_id]
        rep(*args)
        rep.ident = json.loads(rep("id", "--json").stdout)
        self.replicas.append(rep)
        return rep

    def make(self, *names: str, links: Iterable[tuple[str, str]] | None = None) -> list[Replica]:
        """Replicas ``names`` of one tree, peers of each other (all pairs, or ``links``)."""
        reps = [self.add(n) for n in names]
        pairs = links if links is not None else [
            (a.name, b.name) for i, a in enumerate(reps) for b in reps[i + 1 :]
        ]  # fmt: skip
        for a, b in pairs:
            self.link(self[a], self[b])
        return reps

    @staticmethod
    def link(a: Replica, b: Replica) -> None:
        a.add_peer(b)
        b.add_peer(a)

    # -- running ----------------------------------------------------------------------------------

    @property
    def running(self) -> list[Replica]:
        return [r for r in self.replicas if r.running]

    def start(self, *reps: Replica) -> None:
        """Start the daemons of ``reps`` (default: all) together, then wait until each is ready."""
        for r in reps or self.replicas:
            r.start(wait=False)
        for r in reps or self.replicas:
            r.wait_ready()

    def stop(self, *reps: Replica) -> None:
        for r in reps or self.replicas:
            r.stop()

    def close(self) -> None:
        problems = []
        for r in self.replicas:
            try:
                r.stop()
            except Exception as e:  # always go on: no daemon may outlive the test
                problems.append(str(e))
                if r.proc is not None and r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait()
        for r in self.replicas:
            if r.log.exists():
                print(f"===== {r.name}'s daemon log ({r.log}) =====")
                print(r.log.read_text(errors="replace"))
        if problems:
            raise AssertionError("; ".join(problems))

    # -- waiting ----------------------------------------------------------------------------------

    def wait_until(self, cond: Callable[[], object], timeout: float = 30.0, what: str = "") -> Any:
        """Poll ``cond`` until it returns something true (returned), or fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what or cond}\n"
                                     + self.describe())  # fmt: skip
            time.sleep(POLL)

    def describe(self, reps: Sequence[Replica] | None = None) -> str:
        """Where the trees differ, and what each running daemon says about itself."""
        reps = list(reps or self.replicas)
        out = []
        if reps:
            first = reps[0]
            t0 = first.tree()
            for r in reps[1:]:
                diff = tree_diff(t0, r.tree(), (first.name, r.name))
                out.append(f"trees {first.name} vs {r.name}: "
                           + ("identical" if not diff else f"{len(diff)} differences"))  # fmt: skip
                out += diff[:50]
        for r in self.replicas:
            if r.running:
                try:
                    st = r.status()
                except Exception as e:  # the report must not hide the original failure
                    st = {"status failed": str(e)}
                out.append(f"status of {r.name}: {json.dumps(st, indent=1)}")
            else:
                out.append(f"{r.name}: daemon not running")
        return "\n".join(out)

    def identical(self, reps: Sequence[Replica] | None = None) -> bool:
        reps = list(reps or self.replicas)
        t0 = reps[0].tree()
        return all(r.tree() == t0 for r in reps[1:])

    def in_sync(self, reps: Sequence[Replica] | None = None) -> bool:
        """Every running daemon is connected and in sync with each of its peers that runs."""
        reps = [r for r in (reps or self.replicas) if r.running]
        names = {r.name for r in reps}
        for r in reps:
            st = r.status()
            if st is None or st["state"] != "idle":
                return False
            for p in st["peers"]:
                if p["name"] in names and not (p["connected"] and p["in_sync"]):
                    return False
        return True

    def converged(self, reps: Sequence[Replica] | None = None) -> bool:
        return self.identical(reps) and self.in_sync(reps)

    def wait_converged(self, reps: Sequence[Replica] | None = None, timeout: float = 30.0,
                       what: str = "") -> None:  # fmt: skip
        """Until the trees of ``reps`` (default: all) are identical and their daemons in sync."""
        names = ", ".join(r.name for r in reps or self.replicas)
        what = f"{names} identical and in sync" + (f" ({what})" if what else "")
        self.wait_until(lambda: self.converged(reps), timeout, what)
