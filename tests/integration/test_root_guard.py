"""A root that is missing or replaced (an unmounted disk, a directory moved aside and an empty one
made in its place) must never be taken for a tree whose every file was deleted."""

from __future__ import annotations

import json
import os

from daemons import Cluster
from helpers import make_replicas, snapshot
from test_sync import populate


def test_a_replaced_root_is_refused_until_accepted(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    a.sync(b)
    before = snapshot(b.root)
    os.rename(a.root, tmp_path / "a-moved-aside")
    a.root.mkdir()  # what an unmounted disk's mount point looks like: an empty directory

    for proc in (a("scan", check=False), a.sync(b, check=False)):
        assert proc.returncode == 1
        assert "not the directory this replica was made on" in proc.stderr
        assert "--accept-root" in proc.stderr
    assert snapshot(b.root) == before  # no deletion went anywhere

    os.rmdir(a.root)
    a.root.mkdir()
    (a.root / "only-file.txt").write_text("restored from an old backup\n")
    out = a("scan", "--accept-root", "-v").stdout  # the user says: this is the tree now
    assert "only-file.txt" in out and "delete" in out
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)


def test_a_missing_root_is_said_by_every_command_that_touches_it(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    a.sync(b)
    a("peer", "add", "b", "tcp://127.0.0.1:9", b.identity()["public_key"])
    os.rename(a.root, tmp_path / "elsewhere")
    for args in (("sync", b.config, "--dry-run"), ("sync", b.config), ("scan",), ("sync", "b")):
        # The same answer from each (it was a config error, exit 2, from some): an unmounted
        # disk is no mistake in the config.
        proc = a(*args, check=False)
        assert proc.returncode == 1 and "is not there" in proc.stderr, (args, proc)
        assert "unmounted disk" in proc.stderr and "config error" not in proc.stderr, (args, proc)
    # What only reads the database still works, to tell the user about the replica.
    assert json.loads(a("id", "--json").stdout)["name"] == "a"
    assert "docs/a.txt" in a("dump").stdout


def test_a_daemon_started_while_its_root_is_missing_waits_for_it(tmp_path):
    """A USB disk mounted after the daemon starts: it must wait, not exit with a config error."""
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        populate(a.root)
        aside = tmp_path / "a-unmounted"
        os.rename(a.root, aside)
        cluster.start(b)
        a.start(wait=False)
        status = cluster.wait_until(
            lambda: (s := a.status()) and s["state"] == "error" and s, what="a to start, waiting"
        )
        assert any("is not there" in e["error"] for e in status["errors"])
        assert status["watching"] is False
        # The human view says why nothing is watched, and that it is not inotify's fault.
        text = a("status").stdout
        assert "watching: off until the root is back" in text and "is not there" in text
        assert "inotify" not in text
        os.rename(aside, a.root)  # mounted
        cluster.wait_converged(what="a's tree reaching b once its root is there", timeout=40)
        assert snapshot(b.root) == snapshot(a.root)
        (a.root / "later.txt").write_text("watched\n")
        cluster.wait_until(lambda: (b.root / "later.txt").exists(), what="a live change")


def test_the_daemon_stops_syncing_while_its_root_is_replaced_and_resumes_when_it_is_back(tmp_path):
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        populate(a.root)
        cluster.start()
        cluster.wait_converged(what="initial sync")
        before = snapshot(b.root)

        aside = tmp_path / "a-aside"
        os.rename(a.root, aside)
        a.root.mkdir()
        status = cluster.wait_until(
            lambda: (s := a.status()) and s["state"] == "error" and s,
            what="a to see its root replaced",
        )
        assert any("not the directory this replica was made on" in e["error"]
                   for e in status["errors"])  # fmt: skip
        assert "\n  error: the root " in a("status").stdout  # said of the replica, not a path
        for args in (("sync", "b"), ("scan",)):  # through the daemon: said at once, not a hang
            proc = a(*args, check=False)
            assert proc.returncode == 1 and "not the directory" in proc.stderr, (args, proc)
        proc = a("scan", "/etc", check=False)
        assert proc.returncode == 2 and "not inside the replicated tree" in proc.stderr
        (b.root / "from-b.txt").write_text("written while a's root was away\n")
        cluster.wait_until(
            lambda: (p := a.peer_status("b")) and p["need_files"] >= 1,
            what="a to hear of b's new file",
        )
        assert snapshot(b.root) | {"from-b.txt": None} == before | {"from-b.txt": None}
        assert list(a.root.iterdir()) == []  # nothing applied into the stranger directory

        os.rmdir(a.root)
        os.rename(aside, a.root)  # the disk is back
        cluster.wait_until(
            lambda: (a.root / "from-b.txt").exists() and a.status()["state"] != "error",
            what="a to resume and catch up",
            timeout=40,
        )
        cluster.wait_converged(what="convergence after the root came back")
        assert not a.status()["errors"]
        (a.root / "docs" / "after.txt").write_text("watched again\n")  # inotify, not a rescan
        cluster.wait_until(lambda: (b.root / "docs" / "after.txt").exists(), what="a new file")


def test_accepting_a_new_root_through_the_daemon_watches_it(tmp_path):
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        populate(a.root)
        cluster.start()
        cluster.wait_converged(what="initial sync")
        os.rename(a.root, tmp_path / "a-old")
        a.root.mkdir()
        (a.root / "restored.txt").write_text("from the backup\n")
        cluster.wait_until(lambda: a.status()["state"] == "error", what="a to refuse its root")
        assert "asked the running daemon" in a("scan", "--accept-root").stdout
        cluster.wait_until(lambda: (b.root / "restored.txt").exists(), what="the accepted tree")
        cluster.wait_until(lambda: not (b.root / "docs").exists(), what="what it lacks, deleted")
        (a.root / "new.txt").write_text("made after\n")
        (a.root / "sub").mkdir()
        (a.root / "sub" / "deeper.txt").write_text("deeper\n")
        cluster.wait_until(
            lambda: (b.root / "sub" / "deeper.txt").exists() and (b.root / "new.txt").exists(),
            what="changes in the accepted root to travel",
            timeout=20,
        )
        assert a.status()["state"] != "error"


def test_a_root_replaced_in_the_middle_of_a_sync_stops_it(tmp_path):
    """The root is checked before every batch: a disk unplugged halfway must not have the rest
    written into the empty mount point (and the files missing from it recorded as deleted)."""
    from repld.daemon import localsync
    from repld.daemon.errors import RootChanged
    from repld.daemon.replica import open_replica

    a, b = make_replicas(tmp_path, "a", "b")
    for i in range(2500):  # several batches
        (a.root / f"f{i:04}.txt").write_text(f"{i}\n")
    aside = tmp_path / "b-aside"
    swapped = []

    def unplug(stats: object) -> None:
        if not swapped:
            os.rename(b.root, aside)
            b.root.mkdir()
            swapped.append(True)

    with open_replica(a.config) as left, open_replica(b.config) as right:
        try:
            localsync.sync(left, right, direction=localsync.Direction.PUSH, progress=unplug)
        except RootChanged as e:
            assert "not the directory this replica was made on" in str(e)
        else:
            raise AssertionError("the sync went on into the replaced root")
    assert swapped and list(b.root.iterdir()) == []  # nothing written into the stranger
    os.rmdir(b.root)
    os.rename(aside, b.root)
    assert "0 deleted" in b("scan").stdout  # what was recorded is there
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)


def test_a_replica_older_than_the_check_with_an_empty_root_is_refused(tmp_path):
    import sqlite3

    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    a.sync(b)
    db = sqlite3.connect(a.state / "repld.db")
    db.execute("DELETE FROM meta WHERE key = 'root_id'")  # as a replica made before it
    db.commit()
    db.close()
    os.rename(a.root, tmp_path / "a-real")
    a.root.mkdir()  # the disk not mounted at the first run of the new version
    proc = a("scan", check=False)
    assert proc.returncode == 1 and "is empty, but this replica has files" in proc.stderr
    os.rmdir(a.root)
    os.rename(tmp_path / "a-real", a.root)
    assert "0 deleted" in a("scan").stdout


def test_a_watch_lost_while_the_root_was_away_comes_back(tmp_path):
    """Root moved away, a file and then a symlink in its place (watching a symlink fails), then
    the directory back: same identity, so no error to recover from, but the watch must return."""
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        (a.root / "f.txt").write_text("f\n")
        cluster.start()
        cluster.wait_converged(what="initial sync")
        aside = tmp_path / "a-aside"
        os.rename(a.root, aside)
        a.root.write_text("not a directory\n")
        cluster.wait_until(lambda: a.status()["state"] == "error", what="a to see no directory")
        a.root.unlink()
        a.root.symlink_to(aside)
        cluster.wait_until(lambda: not a.status()["watching"], what="the watch to fail")
        a.root.unlink()
        os.rename(aside, a.root)
        cluster.wait_until(lambda: a.status()["watching"], what="a to watch again", timeout=45)
        (a.root / "new.txt").write_text("seen by inotify\n")
        cluster.wait_until(lambda: (b.root / "new.txt").exists(), what="the new file", timeout=10)
