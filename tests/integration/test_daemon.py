"""Real daemons on 127.0.0.1 (real inotify, real CurveZMQ): live sync between 2 and 3 replicas."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from daemons import Cluster, Replica, free_port
from helpers import REPLD, Appender, conflict_copies, run, tmpfs

UNICODE = "ünïcødé € name.txt"
SPACES = "two  words and more.txt"


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        yield c


def populate(root: Path) -> None:
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "empty" / "nested-empty").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("alpha\n")
    (root / "docs" / "deep" / "blob.bin").write_bytes(os.urandom(300_000))
    (root / "docs" / UNICODE).write_text("unicode\n")
    (root / SPACES).write_text("spaces\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (root / "link").symlink_to("docs/a.txt")
    (root / "dangling").symlink_to("/nowhere/at/all")


def started(cluster: Cluster, *names: str, **kw) -> list[Replica]:
    reps = cluster.make(*names, **kw)
    cluster.start()
    cluster.wait_converged(what="first contact")
    return reps


def with_files(cluster: Cluster, n: int, under: str = "") -> list[Replica]:
    """Daemons a and b running, in sync on ``n`` small files f000... made on a (in ``under``)."""
    a, b = cluster.make("a", "b")
    where = a.root / under
    where.mkdir(exist_ok=True)
    for i in range(n):
        (where / f"f{i:03}").write_text(f"{i}\n")
    cluster.start()
    cluster.wait_converged(what=f"{n} files")
    return [a, b]


def test_initial_sync_of_a_populated_tree(cluster):
    a, b, c = cluster.make("a", "b", "c")
    populate(a.root)
    (c.root / "from-c.txt").write_text("c was here\n")
    cluster.start()
    cluster.wait_converged(what="initial sync")
    for r in (b, c):
        assert os.access(r.root / "run.sh", os.X_OK)
        assert os.readlink(r.root / "dangling") == "/nowhere/at/all"
        assert os.readlink(r.root / "link") == "docs/a.txt"
        assert (r.root / "docs" / UNICODE).read_text() == "unicode\n"
        assert (r.root / "empty" / "nested-empty").is_dir()
    assert (a.root / "from-c.txt").read_text() == "c was here\n"
    assert not any(r.status()["errors"] for r in cluster.replicas)


def _editor_save(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.rename(tmp, path)


def test_every_live_change_on_either_side(cluster):
    a, b = cluster.make("a", "b")
    populate(a.root)
    cluster.start()
    cluster.wait_converged(what="initial sync")
    ra, rb = a.root, b.root
    changes = [
        ("create on a", lambda: (ra / "new.txt").write_text("new\n")),
        ("create on b", lambda: (rb / "docs" / "from-b.txt").write_text("b\n")),
        ("mkdir on b", lambda: (rb / "made-on-b").mkdir()),
        ("edit on b", lambda: (rb / "docs" / "a.txt").write_text("alpha, edited on b\n")),
        ("edit on a", lambda: (ra / "new.txt").write_text("new, edited on a\n")),
        ("append on a", lambda: (ra / "docs" / "deep" / "blob.bin").open("ab").write(b"x" * 5000)),
        ("chmod on a", lambda: (ra / "run.sh").chmod(0o700)),
        ("chmod on b", lambda: (rb / "new.txt").chmod(0o640)),
        ("delete on b", lambda: (rb / SPACES).unlink()),
        ("delete on a", lambda: (ra / "dangling").unlink()),
        ("rename on a", lambda: os.rename(ra / "docs" / UNICODE, ra / "docs" / "renamed é.txt")),
        ("rename on b", lambda: os.rename(rb / "new.txt", rb / "made-on-b" / "moved.txt")),
        ("symlink on b", lambda: (rb / "link2").symlink_to("made-on-b/moved.txt")),
        ("move a directory on a", lambda: os.rename(ra / "docs" / "deep", ra / "deep-moved")),
        ("move a directory on b", lambda: os.rename(rb / "empty", rb / "made-on-b" / "empty")),
        ("editor save on a", lambda: _editor_save(ra / "docs" / "a.txt", "saved by an editor\n")),
        ("editor save on b", lambda: _editor_save(rb / "run.sh", "#!/bin/sh\necho saved\n")),
        ("delete a tree on b", lambda: shutil.rmtree(rb / "deep-moved")),
        ("delete a tree on a", lambda: shutil.rmtree(ra / "made-on-b")),
    ]
    for what, change in changes:
        change()
        cluster.wait_converged(what=what)
    assert not (b.root / "docs" / "deep").exists() and not (a.root / "deep-moved").exists()
    assert (b.root / "docs" / "a.txt").read_text() == "saved by an editor\n"
    assert (a.root / "run.sh").read_text() == "#!/bin/sh\necho saved\n"
    assert not list(a.root.rglob("*.swp")) and not conflict_copies(a.root)
    assert not (a.root / "made-on-b").exists() and not (b.root / "made-on-b").exists()
    assert os.access(a.root / "run.sh", os.X_OK) == os.access(b.root / "run.sh", os.X_OK)


def test_a_symlink_made_again_with_another_target_right_after_it_arrived_replicates(cluster):
    """Links arriving in a directory the daemon had just made (a move on the other side) were
    remembered as the daemon's own writes, and `ln -sfn` over one of them was then taken for
    their echo: never recorded, both sides "in sync" with different targets (a trial)."""
    a, b = cluster.make("a", "b")
    cluster.start()
    for i in range(12):
        (a.root / f"g{i}").mkdir()
        (a.root / f"g{i}" / "f").write_text(f"file {i}\n")
        (a.root / f"g{i}" / "lnk").symlink_to("../nowhere/f")
    cluster.wait_converged(what="the links on b")
    for i in range(12):  # one at a time: a page of a few steps, done in a millisecond
        os.rename(a.root / f"g{i}", a.root / f"h{i}")
        cluster.wait_converged(what=f"g{i} moved on b")
    for i in range(12):
        tmp = b.root / f"h{i}" / ".lnk.new"
        tmp.symlink_to("f")
        os.replace(tmp, b.root / f"h{i}" / "lnk")  # what `ln -sfn f lnk` does
    cluster.wait_converged(what="the new targets on a")
    assert {os.readlink(a.root / f"h{i}" / "lnk") for i in range(12)} == {"f"}


def test_a_file_dated_past_2262_is_not_replicated_and_the_daemon_runs_on(cluster):
    """It killed the daemon at every start (SQLite's 64-bit integers, a trial)."""
    a, b = cluster.make("a", "b")
    far = a.root / "from-2300.txt"
    far.write_text("far\n")
    year_2300 = 10_413_792_000 * 10**9
    os.utime(far, ns=(year_2300, year_2300))
    cluster.start()
    (a.root / "after.txt").write_text("after\n")
    cluster.wait_until(lambda: (b.root / "after.txt").exists(), what="after.txt on b")
    os.utime(far, ns=(year_2300 + 1, year_2300 + 1))  # an event on it: scanned again
    (a.root / "later.txt").write_text("later\n")
    cluster.wait_until(lambda: (b.root / "later.txt").exists(), what="later.txt on b")
    assert a.status() is not None and not (b.root / "from-2300.txt").exists()
    far.touch()
    cluster.wait_converged(what="the file once touched")


def test_a_state_directory_deleted_under_the_daemon_stops_it_saying_why(cluster):
    """It went on syncing into a deleted database (all lost at the next start), and `status`
    said it was not running (its socket went with the directory): a trial."""
    a, b = cluster.make("a", "b")
    cluster.start()
    (a.root / "f.txt").write_text("f\n")
    cluster.wait_converged(what="f.txt on b")
    shutil.rmtree(a.state)
    proc = a.proc
    assert proc is not None
    cluster.wait_until(lambda: proc.poll() is not None, what="a's daemon to stop")
    assert proc.returncode == 1
    text = a.log.read_text()
    assert "database was deleted or replaced while repld ran" in text, text
    assert "Traceback" not in text
    # What it says to do works (a trial found the advice of the day before refused).
    tree = b.identity()["tree_id"]
    advice = f"`repld --config {a.config} rejoin --tree-id {tree}`"
    assert advice in text, text
    proc = a("rejoin", check=False)
    assert proc.returncode == 2 and "rejoin --tree-id TREE_ID" in proc.stderr
    out = a("rejoin", "--tree-id", tree).stdout
    assert "a new database (there was none)" in out and "new key pair" in out, out
    key = a.identity()["public_key"]
    b("peer", "remove", "a")
    b.add_peer_key("a", a.endpoint, key)
    (a.root / "after.txt").write_text("made after the loss\n")
    a.start()
    cluster.wait_converged(what="a back in the tree")
    assert (b.root / "after.txt").exists() and (a.root / "f.txt").read_text() == "f\n"


def test_a_disk_with_both_the_state_and_the_tree_unmounted_is_said_so(cluster):
    """A trial unmounted a USB replica (config, state and tree on it) under its daemon, which
    said the database was deleted and to rejoin: nothing was lost, and a plain restart once
    it was mounted again was all it took."""
    a, b = cluster.make("a", "b")
    cluster.start()
    (a.root / "f.txt").write_text("f\n")
    cluster.wait_converged(what="f.txt on b")
    gone = a.root.parent / "elsewhere"
    gone.mkdir()
    os.rename(a.state, gone / "state")  # as an unmount takes both away at once
    os.rename(a.root, gone / "root")
    proc = a.proc
    assert proc is not None
    cluster.wait_until(lambda: proc.poll() is not None, what="a's daemon to stop")
    text = a.log.read_text()
    assert "is gone, unmounted or unplugged" in text and "Nothing is lost" in text, text
    assert "rejoin" not in text.split("is gone, unmounted")[1].splitlines()[0]
    os.rename(gone / "state", a.state)  # mounted again
    os.rename(gone / "root", a.root)
    (b.root / "later.txt").write_text("later\n")
    a.start()
    cluster.wait_converged(what="a back, as it was")


def test_concurrent_edits_while_apart_keep_both(cluster):
    a, b, c = cluster.make("a", "b", "c")
    (a.root / "f.txt").write_text("base\n")
    cluster.start()
    cluster.wait_converged(what="initial sync")
    b.stop()
    (a.root / "f.txt").write_text("edited on a\n")
    cluster.wait_converged([a, c], what="a's edit reaches c")
    (b.root / "f.txt").write_text("edited on b while apart\n")
    b.start()
    cluster.wait_converged(what="after b came back")
    for r in cluster.replicas:
        copies = conflict_copies(r.root)
        assert len(copies) == 1, (r.name, copies)
        texts = sorted([(r.root / "f.txt").read_text(), (r.root / copies[0]).read_text()])
        assert texts == ["edited on a\n", "edited on b while apart\n"], r.name


def changed_apart(cluster, a, b, on_a: Callable[[], object], on_b: Callable[[], object]) -> None:
    """``a`` and ``b`` in sync on f.txt, then each runs its change while ``b`` is stopped,
    and both are in sync again."""
    (a.root / "f.txt").write_text("base\n")
    cluster.start()
    cluster.wait_converged(what="initial sync")
    b.stop()
    on_a()
    on_b()
    b.start()
    cluster.wait_converged(what="after b came back")


def test_resolve_with_the_daemon_running_settles_the_conflict_everywhere(cluster):
    a, b = cluster.make("a", "b")
    changed_apart(cluster, a, b, lambda: (a.root / "f.txt").write_text("edited on a\n"),
                  lambda: (b.root / "f.txt").write_text("edited on b while apart\n"))  # fmt: skip
    assert len(conflict_copies(a.root)) == 1
    out = a("resolve", "f.txt", "--keep", "local").stdout
    assert "the running daemon records the change" in out
    cluster.wait_until(lambda: not any(conflict_copies(r.root) for r in cluster.replicas)
                       and cluster.converged(), what="the resolution reaches b")  # fmt: skip
    for r in cluster.replicas:
        assert (r.root / "f.txt").read_text() == "edited on a\n", r.name
        assert json.loads(r("conflicts", "--json").stdout) == [], r.name


def test_a_directory_taken_off_the_ignore_rules_comes_over(cluster):
    a, b = cluster.make("a", "b")
    (a.root / ".repldignore").write_text("cache/\n")
    (a.root / "cache").mkdir()
    (a.root / "cache" / "x").write_text("x from a\n")
    (b.root / "cache").mkdir()
    (b.root / "cache" / "y").write_text("y from b\n")
    cluster.start()
    cluster.wait_until(lambda: (b.root / ".repldignore").exists(), what="the rules reach b")
    (a.root / ".repldignore").write_text("")  # both daemons now replicate cache/
    cluster.wait_converged(what="cache/ replicated both ways")
    assert (b.root / "cache" / "x").read_text() == "x from a\n"
    assert (a.root / "cache" / "y").read_text() == "y from b\n"


def test_most_of_the_tree_deleted_at_once_reaches_no_peer_until_accepted(cluster):
    a, b = with_files(cluster, 150)
    (a.root / "keep.txt").write_text("before\n")
    cluster.wait_until(lambda: (b.root / "keep.txt").exists(), 30, "keep.txt to reach b")
    for i in range(150):
        (a.root / f"f{i:03}").unlink()
    (a.root / "keep.txt").write_text("edited in the same burst\n")
    (a.root / "burst.txt").write_text("made in the same burst\n")
    cluster.wait_until(lambda: a.status()["deletes_held"], 30, "a to hold the deletions back")
    st = a.status()
    assert any("--accept-deletes" in e["error"] for e in st["errors"] if not e["path"]), st
    assert not a.peer_status("b")["in_sync"]  # its own deletions are not sent
    # The burst's other changes are recorded and sent without the deletions.
    cluster.wait_until(lambda: (b.root / "burst.txt").exists()
                       and (b.root / "keep.txt").read_text() == "edited in the same burst\n",
                       30, "the burst's other changes to reach b")  # fmt: skip
    (a.root / "new.txt").write_text("other changes still travel\n")
    cluster.wait_until(lambda: (b.root / "new.txt").exists(), 30, "new.txt to reach b")
    assert len([p for p in b.root.iterdir() if p.name.startswith("f")]) == 150
    out = a("scan", "--accept-deletes").stdout
    assert "asked the running daemon to record the deletions it held back" in out, out
    cluster.wait_until(lambda: not any(p.name.startswith("f") for p in b.root.iterdir()), 30,
                       "the accepted deletions to reach b")  # fmt: skip
    cluster.wait_until(lambda: not a.status()["deletes_held"], 30, "the hold to be lifted")


def test_a_peers_deletion_of_a_file_whose_deletion_is_held_here_is_recorded(cluster):
    """a holds an `rm -rf` back; b deletes some of the same files: a records b's tombstones
    (the files are gone here anyway) instead of rescanning each path, finding its whole
    directory gone and failing on the breaker at every retry."""
    a, b = with_files(cluster, 150, under="bulk")
    shutil.rmtree(a.root / "bulk")
    cluster.wait_until(lambda: a.status()["deletes_held"], 30, "a to hold the deletions back")
    for i in range(5):
        (b.root / "bulk" / f"f{i:03}").unlink()
    cluster.wait_until(
        lambda: all("via b" in a("log", f"bulk/f{i:03}").stdout for i in range(5)),
        30, "a to record b's deletions",
    )
    cluster.wait_until(lambda: a.peer_status("b")["need_files"] == 0, 30, "a to need nothing")
    st = a.status()
    assert st["deletes_held"]  # its own are still held
    assert [e for e in st["errors"] if e["path"]] == [], st["errors"]
    assert "delete by" not in a("log", "bulk/f100").stdout  # held, not recorded


def test_a_daemon_restored_from_an_old_backup_stops_exchanging_until_it_rejoins(cluster):
    a, b = started(cluster, "a", "b")
    (b.root / "f.txt").write_text("v1\n")
    cluster.wait_until(lambda: (a.root / "f.txt").exists(), 30, "f.txt to reach a")
    cluster.stop(b)
    shutil.copytree(b.state, b.state.with_name("backup"))
    cluster.start(b)
    (b.root / "f.txt").write_text("v2, after the backup\n")
    for i in range(10):  # records a sees, which a rescan of the restored database never makes
        (b.root / f"tmp{i}").write_text("short-lived\n")
    cluster.wait_until(lambda: (a.root / "tmp9").exists(), 30, "the temporary files to reach a")
    for i in range(10):
        (b.root / f"tmp{i}").unlink()
    cluster.wait_until(lambda: not (a.root / "tmp0").exists(), 30, "their deletion to reach a")
    cluster.wait_converged(what="v2")
    cluster.stop(b)
    shutil.rmtree(b.state)
    shutil.copytree(b.state.with_name("backup"), b.state)
    (b.root / "g.txt").write_text("made after the restore\n")
    cluster.start(b)
    cluster.wait_until(lambda: b.status()["state"] == "error", 30, "b to notice the restore")
    st = b.status()
    assert any("restored from an older backup" in e["error"] and "rejoin" in e["error"]
               for e in st["errors"]), st["errors"]  # fmt: skip
    cluster.stop(b)
    b("rejoin")
    cluster.start(b)
    cluster.wait_converged(what="after the rejoin")
    assert (a.root / "g.txt").read_text() == "made after the restore\n"
    assert (a.root / "f.txt").read_text() == "v2, after the backup\n"


def test_the_log_of_a_daemon_run_by_hand_has_the_time(cluster):
    """Under systemd the journal stamps each line; on a terminal or in a file, repld does."""
    (a,) = started(cluster, "a")
    lines = [ln for ln in a.log.read_text().splitlines() if "repld: INFO:" in ln]
    assert lines, a.log.read_text()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} repld: INFO: ", ln)
               for ln in lines), lines  # fmt: skip


def test_a_write_through_one_hard_link_reaches_the_other_names_too(cluster):
    """inotify names only the link written to; the file's other names changed as well."""
    a, b = started(cluster, "a", "b")
    (a.root / "h1").write_text("base\n")
    os.link(a.root / "h1", a.root / "h2")
    cluster.wait_until(lambda: (b.root / "h2").exists(), 30, "both names to reach b")
    with open(a.root / "h1", "a") as f:
        f.write("more\n")
    cluster.wait_until(
        lambda: all((b.root / n).read_text() == "base\nmore\n" for n in ("h1", "h2")),
        30, "the write to reach both names on b",
    )
    cluster.wait_converged(what="after the write")


def test_a_name_that_is_not_utf8_is_reported_in_valid_json_until_it_goes(cluster):
    import subprocess

    a, b = started(cluster, "a", "b")
    bad = os.fsdecode(b"caf\xe9-latin1.txt")
    (a.root / bad).write_text("latin-1 name\n")
    cluster.wait_until(lambda: any(e["path"] == bad for e in a.status()["errors"]), 30,
                       "the name to be reported")  # fmt: skip
    out = subprocess.run([*REPLD, "--config", a.config, "status", "--json"],
                         capture_output=True, check=True).stdout  # fmt: skip
    st = json.loads(out.decode("utf-8"))  # valid UTF-8, and the name comes back as it is
    (err,) = [e for e in st["errors"] if e["path"] == bad]
    assert "not valid UTF-8" in err["error"] and "rename it" in err["error"]
    # A notice, not a failure: `sync PEER` through the daemon exits 0 (it exited 1 for as long
    # as the name stayed, a trial).
    synced = a("sync", "b", check=False)
    assert synced.returncode == 0, synced
    assert "not replicated: " in synced.stderr and "error:" not in synced.stderr
    os.rename(a.root / bad, a.root / "cafe-renamed.txt")
    cluster.wait_until(lambda: (b.root / "cafe-renamed.txt").exists(), 30, "the rename")
    cluster.wait_until(lambda: not any(e["path"] == bad for e in a.status()["errors"]), 30,
                       "the error to go with the file")  # fmt: skip


def test_a_full_state_disk_stops_recording_not_the_daemon(cluster):
    """b's database on a small file system that fills up: the scans that cannot be recorded
    are errors in status, the daemon stays up, and once there is room the changes go out."""
    from repld.daemon import config as configmod

    a, b = cluster.make("a", "b")
    state = configmod.load(b.config).state
    saved = cluster.tmp / "b.state.saved"
    shutil.copytree(state, saved)
    with tmpfs(state, "8m"):
        shutil.copytree(saved, state, dirs_exist_ok=True)
        cluster.start()
        cluster.wait_converged(what="first contact")
        st = os.statvfs(state)
        with open(state / "filler", "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 150 * 1024))
        for i in range(1000):
            (b.root / f"f{i:04}").write_text(f"{i}\n")
        cluster.wait_until(
            lambda: any(not e["path"] and "full" in e["error"] for e in b.status()["errors"]),
            30, "b to say it cannot record",
        )
        assert b.running
        (state / "filler").unlink()
        cluster.wait_until(lambda: len(list(a.root.iterdir())) == 1000, 60,
                           "b's files to reach a once there is room")  # fmt: skip
        cluster.wait_until(lambda: not any(not e["path"] for e in b.status()["errors"]), 30,
                           "the error to go")  # fmt: skip
        cluster.stop()


def test_a_file_too_big_for_the_disk_waits_for_room_without_being_fetched(cluster):
    """b's tree on a 2 MiB file system, a 3 MiB file on a: status says there is no room for it,
    and why, before a byte of it is fetched (below the size that keeps a partial copy, every
    retry would fetch it whole again); once the disk grows, it arrives by itself."""
    import subprocess

    from repld.daemon.fetch import PARTIAL_MIN

    disk = cluster.tmp / "b"
    disk.mkdir()
    with tmpfs(disk, "2m"):
        a, b = cluster.make("a", "b")
        cluster.start()
        cluster.wait_converged(what="first contact")
        big = os.urandom(3 << 20)
        assert len(big) < PARTIAL_MIN
        (a.root / "big.bin").write_bytes(big)

        def no_room() -> list[str]:
            return [e["error"] for e in b.status()["errors"] if e["path"] == "big.bin"]

        cluster.wait_until(lambda: any("no room" in e for e in no_room()), 30,
                           "b to say it has no room for big.bin")  # fmt: skip
        assert "3.0 MiB needed" in no_room()[0] and str(disk) in no_room()[0], no_room()
        assert b.status()["transfer"]["fetched_bytes"] < 1 << 20
        assert not (b.root / "big.bin").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        cluster.wait_until(lambda: (b.root / "big.bin").exists(), 60, "big.bin once there is room")
        assert (b.root / "big.bin").read_bytes() == big
        cluster.wait_until(lambda: not no_room(), 30, "the error to go")
        cluster.stop()


def test_a_path_that_cannot_be_replicated_is_logged_once_not_at_every_scan(cluster):
    """A trial: a FIFO's "not replicated" line came again at every whole scan (47 times in 15
    minutes); status lists it all the time, the log says it once."""
    a, b = cluster.make("a", "b")
    os.mkfifo(a.root / "a-fifo")
    cluster.start()
    for i in range(2):
        a("rescan")  # a whole scan; the loop takes it before the write below
        (a.root / f"marker{i}").write_text("m\n")
        cluster.wait_until(lambda i=i: (b.root / f"marker{i}").exists(), 30, f"marker{i}")
    assert any(e["path"] == "a-fifo" for e in a.status()["errors"]), a.status()
    assert a.log.read_text().count("a-fifo: not replicated") == 1, a.log.read_text()


def test_a_file_replaced_by_a_fifo_at_once_is_deleted_on_the_peer(cluster):
    """`rm f && mkfifo f` within the watcher's debounce: the path scan found a FIFO where a
    file was recorded, and recorded nothing. The peer kept the file, asked for a version that
    was gone, and said "syncing" for ever (a trial)."""
    a, b = cluster.make("a", "b")
    (a.root / "ff").write_text("fifo to be\n")
    cluster.start()
    cluster.wait_converged(what="one file")
    os.unlink(a.root / "ff")
    os.mkfifo(a.root / "ff")
    cluster.wait_until(lambda: not (b.root / "ff").exists(), 30, "b to delete ff")
    cluster.wait_until(lambda: cluster.in_sync(), 30, "both to say in sync")
    assert any(e["path"] == "ff" and "FIFO" in e["error"] for e in a.status()["errors"])


def test_files_whose_deletion_is_held_say_so_on_the_peer(cluster):
    """A trial: a held back a mass deletion that took files b had not fetched yet; b listed
    them for as long as it lasted with "the peer has that version no more ...; the newer one
    comes next", and none came. Asked again and still gone, the error says what may be why."""
    a, b = with_files(cluster, 150)
    cluster.stop(b)
    for i in range(5):
        (a.root / f"new{i}").write_text(f"new {i}\n")
    cluster.wait_until(lambda: "new4" in a("dump").stdout, 30, "a to record the new files")
    for p in list(a.root.iterdir()):
        p.unlink()
    cluster.wait_until(lambda: a.status()["deletes_held"], 30, "a to hold the deletions back")
    cluster.start(b)

    def explained() -> bool:
        errs = [e["error"] for e in b.status()["errors"] if e["path"].startswith("new")]
        return bool(errs) and all("unless the peer holds its deletion back" in e for e in errs)

    cluster.wait_until(explained, 40, "b to say the files may be held back on a")
    assert len(list(b.root.iterdir())) == 150


def test_putting_the_files_back_lifts_the_hold_by_itself(cluster):
    a, b = with_files(cluster, 150)
    saved = {p.name: p.read_bytes() for p in a.root.iterdir()}
    for name in saved:
        (a.root / name).unlink()
    cluster.wait_until(lambda: a.status()["deletes_held"], 30, "a to hold the deletions back")
    # An export meanwhile leaves the files out, each said once (the first 20: a trial saw
    # 150 lines), and points at the hold.
    proc = run("--config", a.config, "export", cluster.tmp / "x.bundle", check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("f000:") == 1 and "holds their deletion back" in proc.stderr
    assert proc.stderr.count("left out: f") == 20, proc.stderr
    assert "left out: and 130 more gone from the disk (-v lists them)" in proc.stderr
    proc = run("--config", a.config, "export", "-v", cluster.tmp / "y.bundle", check=False)
    assert proc.stderr.count("left out: f") == 150, proc.stderr
    for name, data in saved.items():  # restored (from a backup, say)
        (a.root / name).write_bytes(data)
    cluster.wait_until(lambda: not a.status()["deletes_held"], 30, "the hold to lift by itself")
    cluster.wait_converged(what="after the restore")
    assert len(list(b.root.iterdir())) == 150


def test_a_slow_mass_deletion_is_held_back_too(cluster):
    """A script deleting one file at a time: the watcher hands each deletion over on its own,
    each a tiny part of the tree; they count together, and the rest waits for a whole scan."""
    import time

    from repld.daemon.node import DEFER_DELETES

    a, b = with_files(cluster, 150)
    for i in range(150):
        (a.root / f"f{i:03}").unlink()
        time.sleep(0.01)  # the script's own pace (longer than the watcher's 5 ms of quiet)
    cluster.wait_until(lambda: a.status()["deletes_held"], 30, "a to hold the deletions back")
    left = [p for p in b.root.iterdir() if p.name.startswith("f")]
    assert len(left) >= 150 - DEFER_DELETES, len(left)


def test_delete_against_modify_while_apart_keeps_the_modification(cluster):
    a, b = cluster.make("a", "b")
    changed_apart(cluster, a, b, (a.root / "f.txt").unlink,
                  lambda: (b.root / "f.txt").write_text("modified on b while apart\n"))  # fmt: skip
    for r in (a, b):
        assert (r.root / "f.txt").read_text() == "modified on b while apart\n"
        assert not conflict_copies(r.root)


def test_chain_relays_both_ways(cluster):
    a, b, c = started(cluster, "a", "b", "c", links=[("a", "b"), ("b", "c")])
    assert [p["name"] for p in a.status()["peers"]] == ["b"]
    (a.root / "from-a.txt").write_text("a\n")
    cluster.wait_converged(what="a's file reaches c through b")
    assert (c.root / "from-a.txt").read_text() == "a\n"
    (c.root / "sub").mkdir()
    (c.root / "sub" / "from-c.txt").write_text("c\n")
    cluster.wait_converged(what="c's file reaches a through b")
    assert (a.root / "sub" / "from-c.txt").read_text() == "c\n"
    (a.root / "from-a.txt").unlink()
    cluster.wait_converged(what="a's delete reaches c")
    assert not (c.root / "from-a.txt").exists()


def test_one_side_reaching_the_other_is_enough(cluster):
    """A laptop behind NAT: it dials the desktop, the desktop cannot dial it back, yet changes
    flow both ways over the one connection."""
    desk, lap = cluster.make("desk", "lap", links=[])
    lap.add_peer(desk)
    desk.add_peer_key("lap", f"tcp://127.0.0.1:{free_port()}", lap.public_key)  # nobody there
    (desk.root / "from-desk.txt").write_text("desk\n")
    (lap.root / "from-lap.txt").write_text("lap\n")
    cluster.start()
    cluster.wait_converged(what="both files cross the laptop's one connection")
    assert (lap.root / "from-desk.txt").read_text() == "desk\n"
    assert (desk.root / "from-lap.txt").read_text() == "lap\n"


def test_peer_offline_during_a_delete_does_not_bring_it_back(cluster):
    a, b, c = cluster.make("a", "b", "c")
    (a.root / "doomed.txt").write_text("delete me\n")
    (a.root / "keep.txt").write_text("keep\n")
    cluster.start()
    cluster.wait_converged(what="initial sync")
    c.stop()
    (a.root / "doomed.txt").unlink()
    cluster.wait_converged([a, b], what="the delete reaches b")
    a.stop()  # c can learn of the delete only through b
    c.start()
    cluster.wait_converged([b, c], what="c back, with only b up")
    a.start()
    cluster.wait_converged(what="all three up")
    for r in cluster.replicas:
        assert not (r.root / "doomed.txt").exists(), r.name
        assert (r.root / "keep.txt").exists(), r.name
    # The peers that deleted it for a's change kept it as a version; a deleted it itself.
    for r in (b, c):
        kept = json.loads(r("versions", "--json").stdout)
        assert [v["path"] for v in kept] == ["doomed.txt"], r.name
        assert Path(kept[0]["file"]).read_text() == "delete me\n"
    assert json.loads(a("versions", "--json").stdout) == []
    # A later change still travels, and the deleted file still does not come back with it.
    (c.root / "later.txt").write_text("later\n")
    cluster.wait_converged(what="a later change")
    assert not any((r.root / "doomed.txt").exists() for r in cluster.replicas)


BIG = 256 << 20
CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            h.update(data)
    return h.hexdigest()


def test_receiver_killed_mid_transfer_resumes_without_refetching(cluster):
    a, b = cluster.make("a", "b")
    big = a.root / "big.bin"
    with open(big, "wb") as f:
        for _ in range(BIG // CHUNK):
            f.write(os.urandom(CHUNK))
    digest = _sha256(big)
    a.start()
    cluster.wait_until(lambda: a.status()["local"]["bytes"] == BIG, 30, "a has scanned big.bin")
    target = b.root / "big.bin"
    partial_dir = b.state / "partial"
    observed: list[int] = []

    def no_partial_under_real_name() -> None:
        if target.exists():
            assert target.stat().st_size == BIG, "a partial file under the real name"

    def caught_mid_way() -> bool:
        no_partial_under_real_name()
        sizes = [p.stat().st_size for p in partial_dir.glob("*")] if partial_dir.is_dir() else []
        if sizes:
            observed.append(max(sizes))
        assert not target.exists(), "the transfer finished before it could be interrupted"
        return bool(sizes) and max(sizes) >= 16 << 20

    b.start(wait=False)
    cluster.wait_until(caught_mid_way, 30, "b's partial/ file to grow past 16 MiB")
    b.kill()
    at_kill = max(p.stat().st_size for p in partial_dir.glob("*"))
    assert at_kill < BIG, at_kill
    no_partial_under_real_name()
    b.start(wait=False)

    def done() -> bool:
        no_partial_under_real_name()
        return b.running and cluster.in_sync() and target.exists()

    cluster.wait_until(done, 30, "b to finish big.bin after its restart")
    assert _sha256(target) == digest
    assert cluster.identical()
    t = b.status()["transfer"]
    assert t["fetched_bytes"] < BIG, (t, at_kill, observed)
    assert t["resumed_bytes"] > 0, t
    assert t["fetched_bytes"] + t["resumed_bytes"] + t["reused_bytes"] >= BIG, t
    assert not list(partial_dir.glob("*")), "the partial copy outlived the transfer"


def test_big_file_edit_fetches_only_the_changed_blocks(cluster):
    a, b = cluster.make("a", "b")
    size = 24 << 20  # big enough for the resumable spool path (>= 4 MiB)
    big = a.root / "disk.img"
    big.write_bytes(os.urandom(size))
    cluster.start()
    cluster.wait_converged(what="the first copy of disk.img")
    first = b.status()["transfer"]
    with open(big, "r+b") as f:  # one MiB in the middle rewritten, in place
        f.seek(10 << 20)
        f.write(os.urandom(1 << 20))
    digest = _sha256(big)
    cluster.wait_until(lambda: _sha256(b.root / "disk.img") == digest, 60, "the edit to reach b")
    cluster.wait_converged(what="a and b in sync after the edit")
    t = b.status()["transfer"]
    fetched = t["fetched_bytes"] - first["fetched_bytes"]
    reused = t["reused_bytes"] - first["reused_bytes"]
    assert 0 < fetched <= 4 << 20, t  # the changed block(s), not the file
    assert fetched + reused == size, t
    assert cluster.identical()
    assert not list((b.state / "partial").glob("*")), "the spool outlived the transfer"


@pytest.mark.parametrize("running", [False, True], ids=["b-away", "b-running"])
def test_a_file_moved_and_edited_fetches_only_the_changed_blocks(cluster, running):
    """A trial: `mv big.bin moved.bin`, then 1 MiB of it rewritten before b took the move: b
    fetched the whole file, though its old copy at the old path had all but that MiB."""
    a, b = cluster.make("a", "b")
    size = 24 << 20
    (a.root / "big.bin").write_bytes(os.urandom(size))
    cluster.start()
    cluster.wait_converged(what="big.bin on both")
    first = b.status()["transfer"]
    if not running:
        cluster.stop(b)
    os.rename(a.root / "big.bin", a.root / "moved.bin")
    with open(a.root / "moved.bin", "r+b") as f:
        f.seek(5 << 20)
        f.write(os.urandom(1 << 20))
    digest = _sha256(a.root / "moved.bin")
    if not running:
        cluster.wait_until(lambda: "moved.bin" in a("dump").stdout and "big.bin" not in
                           [ln.split(" ")[0] for ln in a("dump").stdout.splitlines()
                            if " D " not in ln], 30, "a to record the move")  # fmt: skip
        cluster.start(b)
    moved = b.root / "moved.bin"
    cluster.wait_until(lambda: moved.exists() and _sha256(moved) == digest, 60, "moved.bin on b")
    cluster.wait_converged(what="a and b in sync after the move")
    t = b.status()["transfer"]
    fetched = t["fetched_bytes"] - (first["fetched_bytes"] if running else 0)
    assert 0 < fetched <= 4 << 20, t  # the changed block(s), not the file
    assert not (b.root / "big.bin").exists()
    assert cluster.identical()


def test_a_copy_made_from_a_file_here_counts_as_reused_not_fetched(cluster):
    """A trial: b copied a file it had already (same content, new name) and status said 0
    bytes reused: only blocks of fetched files counted."""
    a, b = cluster.make("a", "b")
    data = os.urandom(300_000)
    (a.root / "orig.bin").write_bytes(data)
    cluster.start()
    cluster.wait_converged(what="orig.bin")
    first = b.status()["transfer"]
    (a.root / "copy.bin").write_bytes(data)
    cluster.wait_until(lambda: (b.root / "copy.bin").exists(), 30, "the copy to reach b")
    cluster.wait_converged(what="the copy")
    t = b.status()["transfer"]
    assert t["reused_bytes"] - first["reused_bytes"] == len(data), t
    assert t["fetched_bytes"] == first["fetched_bytes"], t


def test_a_peer_given_this_replicas_own_key_by_hand_is_not_dialled(cluster):
    (a,) = cluster.make("a")
    key = a.public_key
    with open(a.config, "a") as f:  # as a user editing the config would
        f.write(f'\n[[peer]]\nname = "mirror"\nendpoint = "{a.endpoint}"\n'
                f'public_key = "{key}"\n')  # fmt: skip
    cluster.start()
    cluster.wait_until(lambda: "peer mirror in" in a.log.read_text(), 30, "the error")
    assert "has this replica's own public key, so it is not dialled" in a.log.read_text()
    assert a.running


def test_peer_with_an_unadmitted_key_gets_nothing(cluster):
    a, b = cluster.make("a", "b")
    populate(a.root)
    intruder = cluster.add("intruder")
    intruder.add_peer(a)  # it knows a's key and endpoint, but a never admitted its key:
    stale = zmq.curve_keypair()[0].decode()  # a knows it under a key it does not have
    a.add_peer_key(intruder.name, intruder.endpoint, stale)
    cluster.start()
    cluster.wait_converged([a, b], what="a and b in sync")

    def refused() -> bool:
        p = intruder.peer_status("a")
        return p is not None and bool(p["error"])

    cluster.wait_until(refused, 30, "the intruder's status to show why a refuses it")
    p = intruder.peer_status("a")
    assert not p["connected"] and "key" in p["error"], p
    assert not a.peer_status("intruder")["connected"]
    assert intruder.tree() == {}
    (a.root / "later.txt").write_text("later\n")
    cluster.wait_converged([a, b], what="a later change")
    assert intruder.tree() == {}
    assert not a.peer_status("intruder")["connected"]
    assert intruder.status()["local"]["files"] == 0
    # The refusing side says whose key it refused, and how to admit it.
    refused = [r for r in a.status()["refused"] if r["key"] == intruder.public_key]
    assert refused and refused[0]["count"] >= 1, a.status()["refused"]
    human = a("status").stdout
    assert "refused: " in human and f"repld peer add NAME ENDPOINT '{intruder.public_key}'" in human
    assert "under an old key: `repld peer remove NAME` first" in human  # (a trial's case)


def test_different_tree_ids_refuse_to_sync(cluster):
    a = cluster.add("a")
    b = cluster.add("b", new_tree=True)
    assert a.ident["tree_id"] != b.ident["tree_id"]
    cluster.link(a, b)
    (a.root / "only-a.txt").write_text("a\n")
    (b.root / "only-b.txt").write_text("b\n")
    before = (a.tree(), b.tree())
    cluster.start()

    def both_refused() -> bool:
        peers = [a.peer_status("b"), b.peer_status("a")]
        return all(p is not None and p["error"] and "tree" in p["error"] for p in peers)

    cluster.wait_until(both_refused, 30, "both sides to report the tree mismatch")
    for r, other in ((a, "b"), (b, "a")):
        p = r.peer_status(other)
        assert not p["connected"] and not p["in_sync"], p
    assert (a.tree(), b.tree()) == before


# A ZMTP 3.0 greeting (signature, version, mechanism CURVE, as-server 0, filler) from no one.
GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\x00") + bytes(32)


def test_garbage_on_the_port_does_not_hurt(cluster):
    a, b = started(cluster, "a", "b")
    host, port = "127.0.0.1", a.port
    for payload in (os.urandom(4096), GREETING + os.urandom(4096), GREETING, b"\xff" * 100000,
                    b"GET / HTTP/1.0\r\n\r\n"):  # fmt: skip
        with socket.create_connection((host, port), timeout=5) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(2)
                while s.recv(65536):
                    pass
            except OSError:
                pass  # the daemon may well hang up on us: that is fine
    assert a.running and b.running
    assert a.status()["state"] == "idle"
    (b.root / "after-garbage.txt").write_text("still syncing\n")
    cluster.wait_converged(what="a change after the garbage")
    (a.root / "after-garbage.txt").write_text("both ways\n")
    cluster.wait_converged(what="a change on the attacked side")
    assert a.running


def test_status_exit_codes_and_human_output(cluster):
    a, b = cluster.make("a", "b")
    proc = a("status", check=False)
    assert proc.returncode == 3, proc
    assert "not running" in proc.stderr and "Traceback" not in proc.stderr
    proc = a("status", "--json", check=False)
    assert proc.returncode == 3 and "not running" in proc.stderr
    cluster.start(a)
    out = a("status").stdout
    assert "peer b" in out and b.endpoint in out and "not connected" in out
    cluster.start(b)
    cluster.wait_converged(what="a and b connected")
    out = a("status").stdout
    assert "peer b" in out and "in sync" in out
    st = json.loads(a("status", "--json").stdout)
    assert st["peers"][0]["name"] == "b" and st["peers"][0]["replica_id"] == b.replica_id
    a.stop()
    assert a("status", check=False).returncode == 3


def _apart(cluster: Cluster) -> tuple[Replica, Replica]:
    """a and b in sync, then a's daemon stopped and both sides changed: b's change recorded."""
    a, b = started(cluster, "a", "b")
    (a.root / "shared.txt").write_text("base\n")
    (a.root / "gone.txt").write_text("to be deleted on b\n")
    cluster.wait_converged(what="base files")
    a.stop()
    seq = b.status()["local"]["sequence"]
    (a.root / "new-on-a.txt").write_text("a\n")
    (a.root / "shared.txt").write_text("edited on a\n")
    (b.root / "new-on-b.txt").write_text("b\n")
    (b.root / "gone.txt").unlink()
    cluster.wait_until(lambda: b.status()["local"]["sequence"] >= seq + 2, 30, "b's 2 changes")
    return a, b


def test_one_shot_sync_with_a_running_peer(cluster):
    a, b = _apart(cluster)
    proc = run("--config", a.config, "sync", "b", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (a.root / "gone.txt").exists() and (b.root / "new-on-a.txt").exists()
    assert (b.root / "shared.txt").read_text() == "edited on a\n"
    assert (a.root / "new-on-b.txt").read_text() == "b\n"
    # Both directions reported, each under the replica that changed.
    assert "a: 1 files written" in proc.stdout and "1 deleted" in proc.stdout, proc.stdout
    assert "b: 2 changes sent from here and acknowledged" in proc.stdout, proc.stdout
    assert " <- " not in proc.stdout, proc.stdout  # the changes are listed with -v only
    cluster.wait_converged(what="after the one-shot sync")
    again = a("sync", "b", "-n").stdout
    assert "0 actions planned" in again, again
    # -v lists each change made here, as with a replica's config file (it listed none).
    seq = b.status()["local"]["sequence"]
    (b.root / "later.txt").write_text("later\n")
    cluster.wait_until(lambda: b.status()["local"]["sequence"] > seq, 30, "b to record it")
    out = a("sync", "b", "-v").stdout
    assert "a <- write   later.txt" in out, out


def test_one_shot_sync_with_a_peer_and_a_path_says_it_only_pulls(cluster):
    """`sync PEER PATH` sent nothing without a word, and `--push-only PATH` did nothing with
    exit 0 (a trial): a PATH limits what this replica takes from a peer; it says so."""
    a, b = _apart(cluster)
    proc = a("sync", "b", "--push-only", "new-on-a.txt", check=False)
    assert proc.returncode == 2 and "what it sends cannot be limited" in proc.stderr
    out = a("sync", "b", "new-on-b.txt").stdout
    assert (a.root / "new-on-b.txt").read_text() == "b\n"
    assert "b: nothing sent: with a peer, a PATH limits only what this replica takes" in out
    assert not (b.root / "new-on-a.txt").exists()  # as said
    proc = a("sync", "b", "no/such/path", check=False)  # a trial: exit 0, as if it synced
    assert proc.returncode == 2 and "in neither this replica nor b" in proc.stderr, proc.stderr


def test_sync_with_a_peer_through_the_running_daemon(cluster):
    """With this replica's daemon running, `repld sync PEER` asks it and waits: it reports what
    this exchange moved, and says so when the peer cannot be reached instead of hanging."""
    a, b = started(cluster, "a", "b")
    (a.root / "first.txt").write_text("first\n")
    (b.root / "from-b.txt").write_text("a writes this one\n")
    cluster.wait_converged(what="a first file each way")
    cluster.stop(b)
    (a.root / "second.txt").write_text("second\n")
    proc = a("sync", "b", check=False)
    assert proc.returncode == 1 and "not reachable" in proc.stderr, proc.stderr
    cluster.start(b)
    out = a("sync", "b", "-v").stdout
    assert "0 files written" in out, out  # b fetched second.txt; a wrote nothing this time
    assert "the running daemon did this exchange" in out, out  # -v: why nothing is listed
    assert (b.root / "second.txt").read_text() == "second\n"
    # A dry run needs an exchange of its own: refused, saying which daemon to stop and how.
    seq = a.status()["local"]["sequence"]
    proc = a("sync", "b", "-n", check=False)
    pid = a.status()["pid"]
    assert proc.returncode == 2 and f"the daemon (pid {pid}) is running" in proc.stderr
    assert f"kill {pid}" in proc.stderr and "systemctl --user stop repld" in proc.stderr
    assert a.status()["local"]["sequence"] == seq


def test_one_shot_dry_run_changes_nothing(cluster):
    a, b = _apart(cluster)
    before = (a.tree(), b.tree(), a("dump").stdout)
    proc = a("sync", "b", "-n")
    assert "nothing changed" in proc.stdout and "new-on-b.txt" in proc.stdout, proc.stdout
    listed = [ln for ln in proc.stdout.splitlines() if not ln.startswith("dry run")]
    assert len(listed) == len(set(listed)), f"an action listed twice:\n{proc.stdout}"
    assert not (b.root / "new-on-a.txt").exists() and (a.root / "gone.txt").exists()
    # What the peer would be offered is said, not silently left out.
    assert "b: 2 changes from here it has not seen would be offered" in proc.stdout, proc.stdout
    push = a("sync", "b", "-n", "--push-only").stdout
    assert "would be offered" in push and "new-on-b.txt" not in push, push
    after = (a.tree(), b.tree(), a("dump").stdout)
    assert after[:2] == before[:2], "a dry run changed a tree"
    assert after[2] == before[2], "a dry run changed a's database"


def test_peer_key_starting_with_a_dash_can_be_added(cluster):
    """About 1 key in 85 starts with "-" (Z85): `repld peer add NAME ENDPOINT KEY`, exactly as
    `repld id` prints the key, must take it."""
    (a,) = cluster.make("a")
    key = next(k for k in (zmq.curve_keypair()[0].decode() for _ in range(10000)) if k[0] == "-")
    proc = a("peer", "add", "dash", "tcp://127.0.0.1:1", key, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(a("peer", "list", "--json").stdout)[0]["public_key"] == key


def test_a_second_daemon_or_a_taken_port_is_refused_clearly(cluster):
    (a,) = started(cluster, "a")
    proc = a("run", check=False)  # returns at once: the first one answers on the control socket
    assert proc.returncode == 1 and f"pid {a.status()['pid']}" in proc.stderr, proc.stderr
    assert a.running
    (b,) = cluster.make("b")
    text = b.config.read_text()
    b.config.write_text(text.replace(b.endpoint, a.endpoint))  # a's port, taken
    proc = b("run", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "cannot listen" in proc.stderr and "'listen'" in proc.stderr and str(b.config) in proc.stderr


def test_a_mistake_in_the_config_does_not_cut_the_user_off_from_the_running_daemon(cluster):
    (a,) = cluster.make("a")
    cluster.start()
    text = a.config.read_text()
    a.config.write_text(text.replace('conflict_policy = "keep-both"', 'conflict_policy = "keepboth"'))
    proc = a("status")
    assert "idle" in proc.stdout
    assert "warning:" in proc.stderr and "conflict_policy" in proc.stderr and "keepboth" in proc.stderr
    assert "keeps the config it read before" in proc.stderr
    a("pause")
    assert json.loads(a("status", "--json").stdout)["state"] == "paused"
    a("resume")
    # Commands that need the config itself still refuse it, with the file and key.
    proc = a("scan", check=False)
    assert proc.returncode == 2 and "conflict_policy" in proc.stderr
    # A syntax error elsewhere in the file: the state directory is still found.
    a.config.write_text(text.replace("scan_interval = 3600", "scan_interval = 36OO"))
    proc = a("status")
    assert "idle" in proc.stdout and "not valid TOML" in proc.stderr
    # No state directory to be found: the error, as before.
    a.config.write_text("this is [not toml\n")
    proc = a("status", check=False)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr
    a.config.write_text(text)


def test_versioning_follows_a_reloaded_config(cluster):
    """keep_versions changed and SIGHUP: the next deletion follows the new setting (the old
    one stayed until a restart)."""
    a, b = cluster.make("a", "b")
    text = b.config.read_text()
    b.config.write_text(text.replace('keep_versions = "deleted"', 'keep_versions = "off"'))
    for name in ("one.txt", "two.txt"):
        (a.root / name).write_text(f"{name}\n")
    cluster.start()
    cluster.wait_converged(what="two files")
    (a.root / "one.txt").unlink()
    cluster.wait_converged(what="one deletion")
    assert json.loads(b("versions", "--json").stdout) == []
    b.config.write_text(text)  # keep_versions = "deleted" again
    mark = b.log.stat().st_size
    b.proc.send_signal(signal.SIGHUP)
    cluster.wait_until(lambda: "config reloaded" in b.log.read_text()[mark:], what="b to reload")
    (a.root / "two.txt").unlink()
    cluster.wait_converged(what="another deletion")
    assert [v["path"] for v in json.loads(b("versions", "--json").stdout)] == ["two.txt"]


def test_sync_through_the_daemon_reports_a_path_that_keeps_failing(cluster):
    """`repld sync PEER` beside a running daemon waited for in_sync (up to an hour), silently,
    while a path failed at every try: it reports the failure and exits 1."""
    a, b = cluster.make("a", "b")
    (a.root / "precious.txt").write_text("precious\n")
    cluster.start()
    cluster.wait_converged(what="one file")
    (b.state / "versions").write_text("not a folder\n")  # b cannot keep what it would delete
    (a.root / "precious.txt").unlink()
    proc = run("--config", b.config, "sync", "a", check=False, timeout=60)
    assert proc.returncode == 1, proc
    assert "error: precious.txt: its current content could not be kept" in proc.stderr
    assert (b.root / "precious.txt").exists()
    (b.state / "versions").unlink()
    cluster.wait_converged(what="the deletion, once b can keep the file")


def test_prune_with_the_daemon_running_asks_it_to_drop_what_both_have_seen(cluster):
    a, b = cluster.make("a", "b")
    (a.root / "old.txt").write_text("to be deleted\n")
    (a.root / "stays.txt").write_text("stays\n")
    cluster.start()
    cluster.wait_converged(what="the files on both")
    (a.root / "old.txt").unlink()
    cluster.wait_converged(what="the deletion on both")

    def tombstones(rep) -> list[str]:
        rows = [ln.split(" ") for ln in rep("dump").stdout.splitlines() if not ln.startswith("#")]
        return [r[0] for r in rows if r[3] == "D"]

    assert tombstones(a) == ["old.txt"]
    # Both daemons acknowledge what they got: once each has the other's records, a can drop it.
    out = cluster.wait_until(lambda: (o := a("prune").stdout) and "dropped 1 tombstone" in o
                             and o, what="a's prune to find the tombstone seen by b")  # fmt: skip
    # The command waits for the daemon, and says what it did, not what was there before.
    assert "(by the running daemon)" in out and "no tombstones kept" in out, out
    assert tombstones(a) == []
    (b.root / "new.txt").write_text("still syncing\n")
    cluster.wait_converged(what="a new file after the prune")
    assert not (a.root / "old.txt").exists() and not (b.root / "old.txt").exists()


def test_a_file_brought_back_where_a_tombstone_was_pruned_is_deleted_again(cluster):
    """q pruned the tombstone of z.txt (it never heard of s), then s, which had never seen
    the deletion, brought z.txt back to q. p still holds the tombstone, which q had
    acknowledged: p must send it again, or q and s keep the file for good while p has none
    (a trial found the one-shot sync doing just that)."""
    p, q, s = cluster.make("p", "q", "s", links=[("p", "q"), ("p", "s")])
    (p.root / "z.txt").write_text("deleted later\n")
    (p.root / "stays.txt").write_text("stays\n")
    cluster.start()
    cluster.wait_converged(what="z.txt on all three")
    cluster.stop(s)
    (p.root / "z.txt").unlink()
    cluster.wait_converged([p, q], what="the deletion on p and q")
    cluster.wait_until(lambda: "dropped 1 tombstone" in q("prune").stdout,
                       what="q to drop the tombstone p's records it acknowledged")  # fmt: skip
    p("peer", "remove", "s")
    s("peer", "remove", "p")
    cluster.link(q, s)
    cluster.start(s)
    cluster.wait_converged(timeout=40, what="z.txt deleted again everywhere")
    assert not any((r.root / "z.txt").exists() for r in (p, q, s))


def test_prune_in_a_chain_of_daemons_drops_what_the_far_end_holds(cluster):
    """a-b-c, a and c never connect: b's Acks tell a how far c holds a's records (and c how
    far a holds c's), so each end can drop a tombstone the other end has."""
    a, b, c = cluster.make("a", "b", "c", links=[("a", "b"), ("b", "c")])
    (a.root / "doomed.txt").write_text("deleted later\n")
    (c.root / "from-c.txt").write_text("c was here\n")  # a hears of c
    cluster.start()
    cluster.wait_converged(what="both files everywhere")
    (a.root / "doomed.txt").unlink()
    (c.root / "from-c.txt").unlink()
    cluster.wait_converged(what="both deletions everywhere")

    def droppable(rep) -> bool:
        out = json.loads(rep("prune", "-n", "--json").stdout)
        return out["tombstones"] == out["droppable"] == 2

    # (Acks carry it every few seconds: the word takes two hops.)
    cluster.wait_until(lambda: droppable(a), timeout=40, what="a to find both droppable")
    text = a("prune", "-n").stdout
    assert "b says how far it holds this replica's records: has seen them all" in text, text
    assert "dropped 2 tombstones" in a("prune").stdout
    cluster.wait_until(lambda: droppable(c), timeout=40, what="c to find both droppable")
    assert "dropped 2 tombstones" in c("prune").stdout
    (b.root / "after.txt").write_text("after the prunes\n")
    cluster.wait_converged(what="a new file after the prunes")
    assert not any((r.root / name).exists() for r in (a, b, c)
                   for name in ("doomed.txt", "from-c.txt"))  # fmt: skip


def test_the_daemon_prunes_by_itself_the_tombstones_seen_by_all_once_old_enough(cluster):
    a, b = cluster.make("a", "b")
    for rep, days in ((a, "0.00002"), (b, "0")):  # a: after about 2 s; b: never by itself
        text = rep.config.read_text()
        assert "prune_after_days = 30\n" in text  # what init writes
        rep.config.write_text(text.replace("prune_after_days = 30\n",
                                           f"prune_after_days = {days}\n"))  # fmt: skip
    (a.root / "old.txt").write_text("deleted soon\n")
    cluster.start()
    cluster.wait_converged(what="the file on b")
    (a.root / "old.txt").unlink()
    cluster.wait_converged(what="the deletion on b")

    def tombstones(rep) -> int:
        return int(json.loads(rep("prune", "-n", "--json").stdout)["tombstones"])

    cluster.wait_until(lambda: json.loads(a("prune", "-n", "--json").stdout)["droppable"],
                       what="b to acknowledge the deletion")  # fmt: skip
    cluster.wait_until(lambda: a("scan") and tombstones(a) == 0, timeout=30,
                       what="a's daemon to drop the tombstone after a scan")  # fmt: skip
    assert "prune: 1 tombstone(s) every replica has seen" in a.log.read_text()
    assert tombstones(b) == 1  # b's daemon keeps its own: prune_after_days = 0
    (b.root / "new.txt").write_text("still syncing\n")
    cluster.wait_converged(what="a new file after the prune")
    assert not (a.root / "old.txt").exists() and not (b.root / "old.txt").exists()


def test_commands_that_need_the_daemon_stopped_say_which_and_exit_2(cluster, tmp_path):
    """A sync with another replica's config, or an import, beside a running daemon: exit 2
    naming the daemon (they said "in use by another repld process", exit 1: a trial)."""
    a, b = cluster.make("a", "b")
    (a.root / "f.txt").write_text("f\n")
    bundle = tmp_path / "b.bundle"
    b("export", bundle)
    cluster.start(a)
    pid = a.status()["pid"]
    for args, what in ((["sync", b.config, "-n"], "a sync with another replica's config"),
                       (["import", bundle], "an import")):  # fmt: skip
        proc = a(*args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"the daemon of a is running (pid {pid}): {what} needs it stopped" in proc.stderr


def test_prune_forget_with_the_daemon_running(cluster):
    """A replica gone for good stops holding tombstones back once forgotten, with the daemon
    holding the database: the command hands the forgetting to it, and waits to say so."""
    a, b, old = cluster.make("a", "b", "old", links=[("a", "b"), ("a", "old")])
    (a.root / "doomed.txt").write_text("to be deleted\n")
    cluster.start()
    cluster.wait_converged(what="the file on all three")
    cluster.stop(old)
    a("peer", "remove", "old")
    (a.root / "doomed.txt").unlink()
    cluster.wait_converged([a, b], what="the deletion on a and b")
    cluster.wait_until(lambda: "b (" in (o := a("prune", "-n").stdout) and "has seen them all"
                       in o, what="b to acknowledge the deletion")  # fmt: skip
    assert "1 tombstone kept" in a("prune").stdout  # old has not seen it
    out = a("prune", "--forget", "old").stdout
    assert "dropped 1 tombstone" in out and "(by the running daemon)" in out, out
    assert "old (" in out and "not waited for" in out, out
    assert json.loads(a("prune", "--json").stdout)["forgotten"][0]["name"] == "old"
    # It was not gone after all: what it still has of what was deleted since is asked for
    # again (it stayed there alone for good, every side "in sync": a trial); here b still
    # holds the tombstone, which deletes it again everywhere.
    a.add_peer(old)
    cluster.start(old)
    cluster.wait_converged(what="old back, the trees the same")
    assert not any((r.root / "doomed.txt").exists() for r in (a, b, old))


def test_a_log_still_being_appended_here_loses_no_line_to_a_peers_edit(cluster):
    """A program appends to a file on b, line by line, while a edits the same file: b must
    not replace the file under the open descriptor (the lines written after would go to an
    unlinked file). Every line ends up in the file or its conflict copy, on both."""
    a, b = cluster.make("a", "b")
    (a.root / "app.log").write_text("")
    cluster.start()
    cluster.wait_until(lambda: (b.root / "app.log").exists(), what="app.log on b")
    with Appender(b.root / "app.log") as writer:
        for i in range(10):
            writer.line(f"b line {i}")
        cluster.wait_until(lambda: "b line 9" in (a.root / "app.log").read_text(),
                           what="b's first lines on a")  # fmt: skip
        with open(a.root / "app.log", "a") as f:
            f.write("a note\n")
        cluster.wait_until(lambda: any("open for writing" in e["error"]
                                       for e in b.status()["errors"]),
                           what="b to hold a's version back")  # fmt: skip
        for i in range(10, 20):
            writer.line(f"b line {i}")

    def every_line_kept() -> bool:
        for rep in (a, b):
            text = "".join(p.read_text() for p in rep.root.iterdir() if p.name.startswith("app"))
            if "a note" not in text or any(f"b line {i}\n" not in text for i in range(20)):
                return False
        return cluster.converged()

    cluster.wait_until(every_line_kept, 60, "every line on both, once the writer is done")


def test_a_peer_at_an_address_where_nothing_answers_is_said_so(cluster):
    """A wrong port (or a machine that is off) showed only "not connected, last seen never"."""
    a, b = cluster.make("a", "b", links=[])
    wrong = f"tcp://127.0.0.1:{free_port()}"
    a.add_peer_key("b", wrong, b.public_key)
    a.start()
    peer = cluster.wait_until(lambda: (p := a.peer_status("b")) and p["error"] and p,
                              what="a to say nothing answers")  # fmt: skip
    assert f"nothing answers at {wrong}" in peer["error"] and not peer["connected"], peer
    assert "wrong address or port" in a("status").stdout
    # The right address: connected, and the note goes.
    a("peer", "remove", "b")
    a.add_peer(b)
    b.add_peer(a)
    b.start()
    cluster.wait_until(lambda: (p := a.peer_status("b")) and p["connected"] and not p["error"],
                       what="a connected to b, the note gone")  # fmt: skip


def test_a_listen_address_that_cannot_be_used_says_why(cluster):
    """A trial: every failure to listen asked whether another program used the port, and a
    port out of range was only "expected tcp://HOST:PORT"."""
    import subprocess

    (a,) = cluster.make("a")
    text = a.config.read_text()
    a.config.write_text(text.replace(a.endpoint, "tcp://192.0.2.7:47120"))  # not this machine's
    proc = subprocess.run([*REPLD, "--config", a.config, "run"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc
    assert "no network interface of this machine has that address" in proc.stderr, proc.stderr
    a.config.write_text(text.replace(a.endpoint, "tcp://0.0.0.0:99999"))
    proc = a("id", check=False)
    assert proc.returncode == 2 and "port 99999 is out of range" in proc.stderr, proc.stderr


def test_a_dry_run_with_prefer_lists_the_conflict_it_settles(cluster):
    """A trial: `sync PEER -n -v --prefer local` listed nothing for a file edited on both sides
    (this side wins with nothing to write here), hiding that the peer's edit is overwritten."""
    a, b = _apart(cluster)
    seq = b.status()["local"]["sequence"]
    (b.root / "shared.txt").write_text("edited on b\n")
    cluster.wait_until(lambda: b.status()["local"]["sequence"] > seq, 30, "b to record its edit")
    out = a("sync", "b", "-n", "-v", "--prefer", "local").stdout
    (line,) = [ln for ln in out.splitlines() if "shared.txt" in ln]
    assert "conflict: a's version wins (prefer a)" in line, out


def test_two_editors_saving_one_file_on_both_sides_end_in_sync(cluster):
    """A trial: editor-style saves of one file on both replicas at once, 30 each, tens of ms
    apart, ended with identical trees but both daemons "not in sync" for good: errors about
    conflict copies the peer no longer had ("the newer one comes next") that nothing cleared."""
    import threading

    a, b = started(cluster, "a", "b")
    (a.root / "live").mkdir()
    cluster.wait_until(lambda: (b.root / "live").is_dir(), 30, "live/ on b")

    saved = []

    def editor(root: Path, side: str, pause: float) -> None:
        for i in range(30):
            path = root / "live" / "shared.txt"
            tmp = root / "live" / f".shared.txt.tmp-{side}"
            tmp.write_text(f"{side} version {i}\n")
            os.rename(tmp, path)
            time.sleep(pause)  # (an editor's pace: the point is the overlap, not the timing)
        saved.append(side)

    threads = [threading.Thread(target=editor, args=(a.root, "a", 0.03)),
               threading.Thread(target=editor, args=(b.root, "b", 0.045))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(saved) == ["a", "b"], saved
    cluster.wait_converged(timeout=90, what="both editors' saves settled")
    for r in (a, b):
        assert r.status()["errors"] == [], r.status()["errors"]


def test_the_log_names_the_path_of_a_conflict_not_its_copy(cluster):
    """A directory that holds files beats a file: the losing file's copy is written first, and
    the log said "conflict on c9.conflict-...: ...; the other version kept as c9.conflict-..."."""
    a, b = cluster.make("a", "b")
    (a.root / "c9").mkdir()
    (a.root / "c9" / "x").write_text("in\n")
    cluster.start()
    cluster.wait_converged(what="c9 on both")
    cluster.stop(b)
    shutil.rmtree(a.root / "c9")
    (a.root / "c9").write_text("a file now\n")
    cluster.wait_until(lambda: " create " in (a("log", "c9", check=False).stdout.strip()
                                              .splitlines() or [""])[-1],
                       30, "a to record the file")  # fmt: skip
    (b.root / "c9" / "newfile").write_text("new on b\n")
    cluster.start(b)
    cluster.wait_converged(what="the conflict settled")
    lines = [ln for ln in (a.log.read_text() + b.log.read_text()).splitlines()
             if "conflict on" in ln]  # fmt: skip
    assert lines, "no conflict logged"
    assert all(": conflict on c9: " in ln for ln in lines), lines
    assert (b.root / "c9" / "newfile").read_text() == "new on b\n"


def test_sigterm_stops_a_whole_scan_and_records_none_of_it(cluster):
    """SIGTERM during a first scan of many new files waited for the whole scan (a trial: 15 s
    for 20k files; a home's would outlast systemd's stop timeout, then SIGKILL). The scan now
    stops between directories, records nothing, and the next start scans again."""
    (a,) = cluster.make("a")
    for d in range(1500):
        sub = a.root / f"d{d:04}"
        sub.mkdir()
        for f in range(8):
            (sub / f"f{f}.txt").write_text(f"{d} {f}\n")
    a.start(wait=False)
    cluster.wait_until(lambda: (st := a.status()) is not None and st["state"] == "scanning",
                       30, "a's first scan to start")  # fmt: skip
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=60) == 0
    a.proc = None
    log = a.log.read_text(errors="replace")
    assert "the scan is stopped, nothing of it recorded" in log, log
    assert "d0000/f0.txt" not in a("dump").stdout
    a.start()  # the next start scans again, whole
    assert "d1499/f7.txt" in a("dump").stdout


def test_deletions_on_a_replica_that_never_goes_quiet_are_recorded_all_the_same(cluster):
    """Deletions in numbers wait for a whole scan once the tree is quiet; a trial's replica,
    writing all along, recorded none of them (nor the changes that came in the same batches)
    for as long as it wrote, and a peer's edit meanwhile brought a deleted file back. They are
    recorded within SETTLE_LONGEST now, quiet or not. (This test's writer leaves the daemon
    quiet moments between its scans, as most do: it passes on the code before the bound too,
    and checks what a user sees, not the bound itself.)"""
    import threading

    a, b = with_files(cluster, 60)
    stop = threading.Event()

    def busy() -> None:  # a program writing a line every 2 ms, for at most 60 s
        deadline = time.monotonic() + 60
        with open(a.root / "busy.log", "a") as f:
            for i in itertools.count():
                if stop.wait(0.002) or time.monotonic() > deadline:
                    return
                f.write(f"line {i}\n")
                f.flush()

    writer = threading.Thread(target=busy)
    writer.start()
    try:
        for i in range(40):  # more than DEFER_DELETES: they wait for a whole scan
            (a.root / f"f{i:03}").unlink()
        cluster.wait_until(lambda: not any((b.root / f"f{i:03}").exists() for i in range(40)),
                           45, "the deletions to reach b while a still writes")  # fmt: skip
        assert writer.is_alive()  # recorded and sent while the writing went on
    finally:
        stop.set()
        writer.join()
    cluster.wait_converged(what="the end")
