"""The engine's full-scan timer, driven in process with a fake clock (no sleeping)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import make_replicas
from repld.daemon.node import DEGRADED_SCAN_EVERY, Node, Options
from repld.daemon.replica import open_replica


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
