"""Real daemons on 127.0.0.1: what a user trial found in the engine (daemon/node.py).

- removing a connected peer (`repld peer remove`, which reloads the daemon) must not crash it;
- a peer whose handshakes keep failing must not flood the log (nor be redialled 20 times a
  second);
- a path's entry in `status --json`'s errors must go once the path is fine again, or gone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from daemons import Cluster, free_port
from helpers import make_replicas, wait_for
from repld.daemon import config as configmod
from repld.daemon.node import Node, Options
from repld.daemon.replica import open_replica
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        yield c


# -- 1. removing a connected peer -------------------------------------------------------------


def test_removing_a_connected_peer_keeps_the_daemon_running(cluster):
    a, b, c = cluster.make("a", "b", "c")
    cluster.start()
    cluster.wait_converged(what="first contact")
    a("peer", "remove", "c")  # rewrites a's config and asks the daemon to reload it

    def reloaded() -> str:
        # The reload runs on the daemon's loop after the CLI's request returns: an exit (the
        # crash this is about) ends the wait at once rather than at the deadline.
        if not a.running:
            return "exited"
        st = a.status()
        return "reloaded" if st is not None and [p["name"] for p in st["peers"]] == ["b"] else ""

    got = cluster.wait_until(reloaded, 30, "a to reload its config without c")
    assert got == "reloaded", a.log.read_text(errors="replace")
    assert "Traceback" not in a.log.read_text(errors="replace")

    def c_dropped() -> bool:
        p = c.peer_status("a")
        return p is not None and not p["connected"]

    cluster.wait_until(c_dropped, 30, "c's session with a to end")
    (a.root / "after-removal.txt").write_text("still syncing with b\n")
    cluster.wait_until(lambda: (b.root / "after-removal.txt").exists(), 30,
                       "a change on a to reach b after c's removal")  # fmt: skip
    cluster.wait_converged([a, b], what="a and b after c's removal")
    assert a.running and a.status() is not None
    (b.root / "from-b.txt").write_text("and back\n")
    cluster.wait_converged([a, b], what="a change on b after c's removal")
    assert not c.peer_status("a")["connected"]  # (c still has a's changes: b relays them)


# -- 2. handshakes that keep failing ----------------------------------------------------------


class _Admit:
    """ZAP: admit no one, until told to admit everyone."""

    def __init__(self) -> None:
        self.anyone = False

    def callback(self, domain: str, key: bytes) -> bool:
        return self.anyone


@pytest.mark.parametrize("why", ["wrong key", "key refused"])
def test_failing_handshakes_are_backed_off_and_logged_rarely(cluster, why):
    """A peer at an endpoint whose handshakes fail every time: listed under a key it does not
    have ("its public key is not the one listed here"), or refusing our key. A CURVE server in the test stands
    for the peer, so every dial shows as a connection it accepts. Once the peer admits our key,
    the next dial gets through (ZeroMQ alone never dials again after a refusal)."""
    ctx = zmq.Context()
    auth = None
    zap = _Admit()
    server = ctx.socket(zmq.ROUTER)
    monitor = server.get_monitor_socket(zmq.EVENT_ACCEPTED)
    try:
        public, secret = zmq.curve_keypair()
        server.curve_secretkey = secret
        server.curve_publickey = public
        server.curve_server = True
        if why == "key refused":
            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve_callback(domain="test", credentials_provider=zap)
            server.zap_domain = b"test"
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        server.bind(endpoint)
        (a,) = cluster.make("a")
        listed = zmq.curve_keypair()[0].decode() if why == "wrong key" else public.decode()
        a.add_peer_key("ghost", endpoint, listed)
        started = time.monotonic()
        cluster.start(a)
        accepted = 0

        def attempts() -> int:
            nonlocal accepted
            while monitor.poll(0):
                ev: dict[str, Any] = recv_monitor_message(monitor)
                if ev["event"] == zmq.EVENT_ACCEPTED:
                    accepted += 1
            return accepted

        def observed() -> bool:
            # A few attempts, over a few seconds: without a backoff that is some 60 dials.
            return attempts() >= 4 and time.monotonic() - started >= 3.0

        cluster.wait_until(observed, 30, f"a few handshake attempts ({why})")

        def warnings() -> list[str]:
            text = a.log.read_text(errors="replace")
            return [ln for ln in text.splitlines() if "WARNING" in ln and "ghost" in ln]

        cluster.wait_until(warnings, 10, "the first warning about ghost")
        lines = warnings()
        elapsed = time.monotonic() - started
        assert len(lines) <= 3, f"{len(lines)} warnings in {elapsed:.1f} s:\n" + "\n".join(lines)
        assert accepted <= 10 * elapsed, f"{accepted} dials in {elapsed:.1f} s: no backoff"
        st = a.peer_status("ghost")
        assert st is not None and not st["connected"] and st["error"], st
        assert a.running
        if why == "key refused":
            zap.anyone = True  # the peer took our key: a's hello comes through
            cluster.wait_until(lambda: server.poll(100), 30, "a's hello once ghost admits a")
            assert "connected to" in a.log.read_text(errors="replace")
    finally:
        monitor.close(linger=0)
        server.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()


def test_a_failing_handshake_is_warned_about_once_a_minute(tmp_path: Path, caplog):
    """What a bounded run cannot show: the repeats a minute later, with their count, and the
    pause between dials topping out. In process, with a fake clock."""
    from repld.daemon.node import HANDSHAKE_WARN_EVERY, REDIAL_MAX  # (new with the backoff)

    (rep,) = make_replicas(tmp_path, "a")
    now = [1000.0]
    node = Node(open_replica(rep.config), options=Options(listen=False, watch=False),
                clock=lambda: now[0])  # fmt: skip
    try:
        node.open()
        key = zmq.curve_keypair()[0].decode()
        node._dial(configmod.Peer("ghost", f"tcp://127.0.0.1:{free_port()}", key))
        (link,) = node.links
        caplog.set_level(logging.WARNING, logger="repld")
        waits = []
        start = now[0]
        while now[0] < start + 1.5 * HANDSHAKE_WARN_EVERY:  # each dial fails, 2 s after it
            node._handshake_failed(link, "handshake with ghost failed")
            waits.append(link.redial_wait)
            now[0] = link.redial_at or now[0]
            node._timers(quick=True)  # dials again: the pause is over
            assert link.redial_at is None
            now[0] += 2.0
        lines = [r.getMessage() for r in caplog.records if "ghost" in r.getMessage()]
        assert len(lines) == 2, lines  # the first, and the repeats once HANDSHAKE_WARN_EVERY on
        assert "again" in lines[1] and "more time(s)" in lines[1], lines
        assert waits[:3] == [0.1, 0.2, 0.4] and max(waits) == waits[-1] == REDIAL_MAX
    finally:
        node.close()
        node.rep.close()


# -- 3. errors that no longer hold -------------------------------------------------------------


def _errors_about(rep: Any, name: str) -> list[dict[str, str]]:
    st = rep.status()
    return [] if st is None else [e for e in st["errors"] if name in e["path"]]


def _wait(rep: Any, cond: Any, what: str) -> None:
    """``cluster.wait_until`` for a tree that holds a fifo: its report on a timeout compares the
    trees, and reading a fifo blocks (no writer) until the test runner's own timeout."""
    wait_for(cond, what, 30, explain=lambda: f"status of {rep.name}: {rep.status()}")


def test_an_error_goes_once_its_path_is_gone(cluster):
    (a,) = cluster.make("a")
    cluster.start()
    os.mkfifo(a.root / "myfifo")
    _wait(a, lambda: _errors_about(a, "myfifo"), "an error about the fifo")
    (a.root / "myfifo").unlink()
    cluster.wait_until(lambda: not _errors_about(a, "myfifo"), 30,
                       "the fifo's error to go with the fifo")  # fmt: skip


def test_an_error_goes_after_a_rescan_finds_its_path_gone(cluster):
    """The same, found by a full scan (the one `repld resume` makes) rather than by the
    watcher: paused, the daemon leaves the watcher's news of the removal alone."""
    (a,) = cluster.make("a")
    cluster.start()
    os.mkfifo(a.root / "myfifo")
    os.mkfifo(a.root / "other-fifo")
    _wait(a, lambda: len(_errors_about(a, "fifo")) == 2, "errors about the fifos")
    a("pause")
    (a.root / "myfifo").unlink()
    a("resume")  # which scans the whole tree first
    _wait(a, lambda: not _errors_about(a, "myfifo"), "the fifo's error to go after a rescan")
    assert [e["path"] for e in _errors_about(a, "fifo")] == ["other-fifo"]


def test_an_error_goes_once_its_path_scans_cleanly(cluster):
    """A fifo replaced by a file of the same name: the file syncs, the fifo's error goes."""
    a, b = cluster.make("a", "b")
    cluster.start()
    cluster.wait_converged(what="first contact")
    os.mkfifo(a.root / "thing")
    _wait(a, lambda: _errors_about(a, "thing"), "an error about the fifo")
    tmp = a.root / "thing.new"
    tmp.write_text("a file now\n")
    os.rename(tmp, a.root / "thing")
    cluster.wait_until(lambda: not _errors_about(a, "thing"), 30,
                       "the error to go once the path holds a file")  # fmt: skip
    cluster.wait_converged(what="the file that replaced the fifo")
    assert (b.root / "thing").read_text() == "a file now\n"


# -- 4. a peer that takes us off its list, then lists us again --------------------------------


def test_a_peer_that_lists_us_again_is_greeted_again_without_a_restart(cluster):
    """d dials a; a cannot dial d (a NAT, say). a removes d, then adds it again: d must find
    its way back by itself, with no restart of either daemon."""
    a, d = cluster.make("a", "d", links=[])
    unreachable = f"tcp://127.0.0.1:{free_port()}"
    a.add_peer_key("d", unreachable, d.public_key)
    d.add_peer(a)
    cluster.start()
    (a.root / "first.txt").write_text("1\n")
    cluster.wait_until(lambda: (d.root / "first.txt").exists(), 30, "first.txt to reach d")
    a("peer", "remove", "d")
    cluster.wait_until(lambda: not d.peer_status("a")["connected"], 30, "d's session to end")
    # d's connection to a outlives the removal, and ZAP is not asked again on it: a says so,
    # rather than drop what d sends in silence (d: "not connected", no reason, for ever).
    cluster.wait_until(lambda: "no longer admits this replica's key"
                       in (d.peer_status("a")["error"] or ""), 30, "d to be told why")  # fmt: skip
    assert d.public_key in [r["key"] for r in a.status()["refused"]]
    assert "no longer admits" in d("status").stdout
    a("peer", "add", "d", unreachable, d.public_key)
    (a.root / "second.txt").write_text("2\n")
    cluster.wait_until(lambda: (d.root / "second.txt").exists(), 45,
                       "second.txt to reach d once a lists it again")  # fmt: skip
    log = d.log.read_text(errors="replace")
    assert "a no longer admits this replica's key" in log, log[-2000:]
    # Back in session: the old reason goes with it (a trial saw it beside "in sync" for 10 s).
    p = cluster.wait_until(lambda: (p := d.peer_status("a")) and p["in_sync"] and p, 30,
                           "d in sync with a")  # fmt: skip
    assert p["error"] is None, p


def test_a_peer_that_removes_us_while_both_dial_says_why_every_time(cluster):
    """Connected both ways, q takes p off its list: p's status said nothing half the time (a
    goodbye on one link, no error on either: a trial)."""
    p, q = cluster.make("p", "q")
    cluster.start()
    for n in range(3):
        (p.root / f"f{n}").write_text(f"{n}\n")
        cluster.wait_converged(what=f"f{n} on q")
        q("peer", "remove", "p")
        cluster.wait_until(lambda: "no longer admits this replica's key"
                           in (p.peer_status("q")["error"] or ""), 30,
                           "p's status to say why")  # fmt: skip
        q.add_peer(p)
        cluster.wait_converged(what="p admitted again")


# -- 5. pause -----------------------------------------------------------------------------------


def test_a_paused_daemon_takes_nothing_in_and_is_not_in_sync_until_resumed(cluster):
    a, b = cluster.make("a", "b")
    cluster.start()
    cluster.wait_converged(what="first contact")
    b("pause")
    cluster.wait_until(lambda: b.status()["state"] == "paused", 30, "b to say it is paused")
    for scan in (["scan"], ["rescan"]):  # a paused daemon records nothing, even when asked
        proc = b(*scan, check=False)
        assert proc.returncode == 1 and "paused" in proc.stderr, (scan, proc.stderr)
    (a.root / "while-paused.txt").write_text("sent while b is paused\n")
    # a has it recorded and offered; b refuses the page: it needs the file and says so.
    cluster.wait_until(lambda: b.peer_status("a")["need_files"] >= 1, 30,
                       "b to count the file it refused while paused")  # fmt: skip
    assert not (b.root / "while-paused.txt").exists()
    assert not b.peer_status("a")["in_sync"] and b.status()["state"] == "paused"
    b("resume")
    cluster.wait_converged(what="after resume")
    assert (b.root / "while-paused.txt").read_text() == "sent while b is paused\n"


def test_a_send_that_ends_the_session_drops_the_rest_of_its_output(tmp_path: Path):
    """A peer stopped (SIGSTOP) long enough for our queue to it to fill: the send that fails
    ends the session, and the page that came with it is not applied on a session that is gone
    (it killed the daemon with an AssertionError). In process: the send fails as ZeroMQ's would."""
    from repld.protocol import messages as wire
    from repld.protocol.session import ApplyPage, Output

    (rep,) = make_replicas(tmp_path, "a")
    node = Node(open_replica(rep.config), options=Options(listen=False, watch=False))
    try:
        node.open()
        key = zmq.curve_keypair()[0].decode()
        node._dial(configmod.Peer("stopped", f"tcp://127.0.0.1:{free_port()}", key))
        (link,) = node.links
        link.session = node._new_session(link, None)

        class FullQueue:
            def send_multipart(self, *args: Any, **kw: Any) -> None:
                raise zmq.Again()

            def close(self, *args: Any, **kw: Any) -> None:
                pass

        real, link.dealer = link.dealer, FullQueue()  # type: ignore[assignment]
        try:
            node._send_out(link, Output(send=[wire.Ping(1)], actions=[ApplyPage((), 5)]))
        finally:
            link.dealer = real
        assert link.session is None
        assert node.store.peer_mark("").seen_seq == 0  # nothing applied, no mark moved
    finally:
        node.close()
        node.rep.close()
