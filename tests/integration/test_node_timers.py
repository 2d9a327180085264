"""The engine's full-scan timer, driven in process with a fake clock (no sleeping)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import make_replicas
from repld.daemon.node import (
    COUNTS_EVERY,
    DEGRADED_SCAN_EVERY,
    SETTLE_DELETES,
    Node,
    Options,
    PeerLink,
)
from repld.daemon.replica import open_replica
from repld.protocol.record import Kind, Record
from repld.protocol.version import VersionVector


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node_with(tmp_path: Path, scan_interval: int) -> tuple[Node, Clock, list[int]]:
    (rep,) = make_replicas(tmp_path, "a")
    text = rep.config.read_text()
    line = f"scan_interval = {scan_interval}"
    rep.config.write_text(re.sub(r"(?m)^scan_interval = .*$", line, text))
    replica = open_replica(rep.config)
    clock = Clock()
    node = Node(replica, options=Options(listen=False, watch=False), clock=clock)
    scans: list[int] = []
    real = node.full_scan

    def counted() -> None:
        scans.append(1)
        real()

    node.full_scan = counted  # type: ignore[method-assign]
    node.open()
    node.first_scan()
    return node, clock, scans


@pytest.fixture
def make_node(tmp_path: Path):
    made: list[Node] = []

    def make(scan_interval: int) -> tuple[Node, Clock, list[int]]:
        node, clock, scans = node_with(tmp_path, scan_interval)
        made.append(node)
        return node, clock, scans

    yield make
    for node in made:
        node.close()
        node.rep.close()


def test_scan_interval_zero_means_no_periodic_scans(make_node) -> None:
    node, clock, scans = make_node(0)
    for _ in range(5):
        clock.now += 10_000
        node.step(0)
    assert len(scans) == 1  # the first scan only


def test_periodic_scans_come_at_the_configured_interval(make_node) -> None:
    node, clock, scans = make_node(600)
    clock.now += 599
    node.step(0)
    assert len(scans) == 1
    clock.now += 2
    node.step(0)
    assert len(scans) == 2


def test_a_requested_rescan_runs_without_a_watcher(make_node) -> None:
    node, clock, scans = make_node(0)
    node.command("rescan")
    node.step(0)
    assert len(scans) == 2
    node.request_full_scan()  # what `resume` and a config reload ask for
    node.step(0)
    assert len(scans) == 3


def test_without_watching_a_one_shot_does_not_fall_back_to_minute_scans(make_node) -> None:
    node, clock, scans = make_node(3600)
    clock.now += DEGRADED_SCAN_EVERY + 1
    node.step(0)
    assert len(scans) == 1


def test_unwatched_directories_are_rescanned_every_minute(tmp_path: Path) -> None:
    (rep,) = make_replicas(tmp_path, "a")
    (rep.root / "sub").mkdir()
    replica = open_replica(rep.config)
    clock = Clock()
    node = Node(replica, options=Options(listen=False, watch=True), clock=clock)
    node.open()
    try:
        node.first_scan()
        w = node.watcher
        assert w is not None and w.alive
        # What the watch limit does to a directory (test_watcher shows the real limit at work).
        w._unwatch_tree("sub")
        w.unwatched.add("sub")
        (rep.root / "sub" / "new.txt").write_text("made where no watch sees it\n")
        node.step(0)
        assert node.store.get("sub/new.txt") is None
        clock.now += DEGRADED_SCAN_EVERY - 1
        node.step(0)
        assert node.store.get("sub/new.txt") is None
        clock.now += 2
        node.step(0)
        rec = node.store.get("sub/new.txt")
        assert rec is not None and not rec.deleted
    finally:
        node.close()
        node.rep.close()


# -- counts for status: a pass over every record, so at most once a COUNTS_EVERY -----------------


def test_status_counts_every_change_once_nothing_is_coming_and_once_a_second_before(
    make_node, monkeypatch
) -> None:
    node, clock, _ = make_node(0)
    root = node.cfg.root
    # No peer is syncing: every change is counted at once.
    (root / "one").write_text("1\n")
    node.full_scan()
    node.publish()
    assert node.snapshot["local"]["files"] == 1
    idle = node._timeout()
    # While a peer's records are still coming in, commits (one a batch) are counted at most
    # once a second...
    peer = {"name": "b", "connected": True, "in_sync": False, "need_files": 5}
    monkeypatch.setattr(node, "_peer_status", lambda: [peer])
    clock.now += COUNTS_EVERY
    (root / "two").write_text("2\n")
    node.full_scan()
    node.publish()
    assert node.snapshot["local"]["files"] == 2
    (root / "three").write_text("3\n")
    node.full_scan()
    clock.now += COUNTS_EVERY / 4
    node.publish()
    assert node.snapshot["local"]["files"] == 2
    # ...but the loop does not sleep past the moment it may count again...
    assert node._timeout() <= COUNTS_EVERY * 3 / 4 + 1e-9
    clock.now += COUNTS_EVERY
    node.step(0)
    assert node.snapshot["local"]["files"] == 3
    assert node._timeout() == idle  # nothing left to count: idle polls are as long as before
    # ...and once nothing more is on its way here, the last change is counted at once (the
    # peer need not be in sync: it may still be taking what this replica relays).
    (root / "four").write_text("4\n")
    node.full_scan()
    node.publish()
    assert node.snapshot["local"]["files"] == 3
    peer["need_files"] = 0
    node.publish()
    assert node.snapshot["local"]["files"] == 4


def test_a_burst_of_deletions_waiting_for_its_scan_is_not_idle(make_node) -> None:
    """Twenty deletions or more in one batch of events wait for a whole scan once the tree is
    quiet (not a mass deletion here: 60 of 300 files); until then the status must not say idle
    (nor any peer in sync) while the deletions are known and not yet recorded."""
    node, clock, _ = make_node(0)
    root = node.cfg.root
    for i in range(300):
        (root / f"f{i:03}").write_text(f"{i}\n")
    node.full_scan()
    gone = [f"f{i:03}" for i in range(60)]
    for name in gone:
        (root / name).unlink()
    node.scan(gone)  # the watcher's batch
    node.publish()
    assert node.snapshot["state"] == "scanning"
    assert node.snapshot["local"]["files"] == 300  # not recorded yet
    clock.now += SETTLE_DELETES
    node.step(0)
    assert node.snapshot["state"] == "idle"
    assert node.snapshot["local"]["files"] == 240


def _file(path: str, size: int) -> Record:
    return Record(path, "g-" + path, Kind.FILE, VersionVector().bump("x"), mode=0o644,
                  mtime_ns=1, size=size, sha256="0" * 64)  # fmt: skip


def test_what_a_peer_still_lacks_is_counted_once_a_second_and_estimated_between(
    make_node, monkeypatch
) -> None:
    node, clock, _ = make_node(0)
    queries: list[int] = []
    monkeypatch.setattr(node.store, "count_since",
                        lambda seq: queries.append(seq) or (1000 - seq, 10 * (1000 - seq)))  # fmt: skip
    link = PeerLink(node.cfg.peers[0] if node.cfg.peers else None)  # type: ignore[arg-type]
    page = [_file(f"f{i}", 10) for i in range(100)]
    # The first page is counted; the next ones, within a second, are estimated from it.
    assert node._still_to_send(link, 0, 100, 1000, page) == (900, 9000)
    assert node._still_to_send(link, 100, 200, 1000, page) == (800, 8000)
    assert node._still_to_send(link, 200, 300, 1000, page) == (700, 7000)
    assert queries == [100]
    # A page that does not follow the last one (the peer asked again from further back).
    assert node._still_to_send(link, 50, 150, 1000, page) == (850, 8500)
    assert queries == [100, 150]
    # A second later, counted again.
    clock.now += COUNTS_EVERY
    assert node._still_to_send(link, 150, 250, 1000, page) == (750, 7500)
    assert queries == [100, 150, 250]
    # The last page: nothing left, exactly, without a count.
    assert node._still_to_send(link, 250, 1000, 1000, page) == (0, 0)
    assert queries == [100, 150, 250]


def test_a_page_that_came_in_while_another_was_applied_is_applied_before_a_later_one(
    tmp_path: Path,
) -> None:
    """A page that arrives while the daemon applies one (fetching its content) waits in the
    inbox; a later page taken straight from the socket must wait behind it. It was applied
    first, the earlier one then looked like a page held already, and its records were never
    asked for again: a trial's chain of three daemons stayed different for good."""
    from repld.protocol import messages as wire

    a, b = make_replicas(tmp_path, "a", "b")
    bid = b.identity()
    a("peer", "add", "b", "tcp://127.0.0.1:9", bid["public_key"])
    node = Node(open_replica(a.config), options=Options(listen=False, watch=False))
    try:
        node.open()
        node.first_scan()
        link = PeerLink(node.cfg.peers[0], rid=b"b", connected=True)
        node.links.append(link)
        node._handle(link, [], wire.Hello(bid["tree_id"], bid["replica_id"], "b", 3, 0,
                                         seen_of=node.store.replica_id))  # fmt: skip
        assert link.established

        def page(name: str, seq: int) -> list[bytes]:
            d = Record(name, f"g-{name}", Kind.DIR, VersionVector.of({bid["replica_id"]: seq}),
                       mode=0o755, modified_by=bid["replica_id"], origin_seq=seq, seq=seq)  # fmt: skip
            return wire.encode(wire.Records((d,), upto=seq))

        early = page("early", 2)
        node._inbox.append((link, early, wire.decode(early)))  # (came in during an apply)
        node._incoming(link, page("later", 3), defer=False)
        node.step(0)
        assert (node.cfg.root / "early").is_dir() and (node.cfg.root / "later").is_dir()
        assert link.session is not None and link.session.seen == 3
    finally:
        node.close()
