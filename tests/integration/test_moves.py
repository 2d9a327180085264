"""A file moved on one replica is renamed on the others, not copied, when they hold it too.

The scanner records a move as the new path with the file's old guid plus a tombstone at the old
path. An apply that brings both renames the file it has at the old path (if it is still as
recorded there) instead of writing a second copy and removing the first: a moved tree of big
files costs no time and no space. Anything else (the old file edited here meanwhile, something
new at the destination, no removal in the same apply) goes the ordinary way, losing nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemons import Cluster
from helpers import make_replicas, snapshot, sync_in_process
from repld.daemon import applier as applier_mod


def inodes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_ino
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".repld")
    }


def test_a_moved_tree_is_renamed_on_the_other_side_not_copied(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "Photos" / "2020").mkdir(parents=True)
    for i in range(3):
        (a.root / "Photos" / "2020" / f"p {i}.jpg").write_bytes(os.urandom(200_000 + i))
    (a.root / "Photos" / "index.txt").write_text("three photos\n")
    (a.root / "stays.txt").write_text("here\n")
    a.sync(b)
    before = inodes(b.root)

    (a.root / "Photos").rename(a.root / "Pictures")
    # The dry run says it as the sync will do it: moved, not written and deleted (a trial).
    dry = a.sync(b, "-n").stdout
    assert "[moved from Photos/2020/p 0.jpg]" in dry, dry
    assert not [ln for ln in dry.splitlines() if "delete" in ln and "p 0.jpg" in ln], dry
    out = a.sync(b, "-v").stdout
    assert snapshot(a.root) == snapshot(b.root)
    assert not (b.root / "Photos").exists()
    after = inodes(b.root)
    for name in ("2020/p 0.jpg", "2020/p 1.jpg", "2020/p 2.jpg", "index.txt"):
        assert after[f"Pictures/{name}"] == before[f"Photos/{name}"], name
    assert "b: 0 files written (0 B, 0 from local copies), 4 moved, 2 deleted" in out
    assert "[moved from Photos/2020/p 0.jpg]" in out
    log = b("log", "Pictures/2020/p 0.jpg").stdout
    assert "moved from Photos/2020/p 0.jpg" in log
    # It points to the old path's events, in a form that can be pasted back.
    assert "(its events before the move: repld log 'Photos/2020/p\\s0.jpg')" in log, log
    assert "history of Photos/2020/p\\s0.jpg:" in b("log", "Photos/2020/p\\s0.jpg").stdout
    # Recorded as any file written there: the next sync (and scan) has nothing to do.
    assert "0 actions planned" in a.sync(b, "-n").stdout
    assert "0 created, 0 updated, 0 deleted" in b("scan").stdout


def test_a_moved_file_edited_here_meanwhile_keeps_the_edit_and_still_arrives(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "old.txt").write_text("the original\n")
    a.sync(b)
    (a.root / "old.txt").rename(a.root / "new.txt")
    a("scan")
    with open(b.root / "old.txt", "a") as f:
        f.write("an edit made on b\n")  # not scanned: the sync's scan of b finds it

    a.sync(b)
    assert (b.root / "new.txt").read_text() == "the original\n"
    # The edit is newer than what a deleted: it lives on, on both sides.
    assert (b.root / "old.txt").read_text() == "the original\nan edit made on b\n"
    assert snapshot(a.root) == snapshot(b.root)


def test_something_new_at_the_destination_is_never_replaced(tmp_path, monkeypatch):
    """A file that appears at the destination between planning and the rename stays: the move
    is planned again against it (a conflict), and neither version is lost."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "old.bin").write_bytes(b"moved content\n")
    a.sync(b)
    (a.root / "old.bin").rename(a.root / "new.bin")

    real = applier_mod.Applier._apply_moves

    def appears_first(self):
        if self._moves:
            (b.root / "new.bin").write_bytes(b"written on b just now\n")
        real(self)

    monkeypatch.setattr(applier_mod.Applier, "_apply_moves", appears_first)
    report = sync_in_process(a, b)
    assert not report.errors, report.errors
    contents = sorted(p.read_bytes() for p in b.root.iterdir() if p.is_file())
    assert b"written on b just now\n" in contents
    assert b"moved content\n" in contents


def test_a_scan_records_each_old_path_right_after_its_move(tmp_path):
    """In seq order (what peers get, in pages): each moved file's new path, then its old
    path's tombstone; the directories' tombstones after their children's, at the end."""
    (a,) = make_replicas(tmp_path, "a")
    (a.root / "Photos" / "2020").mkdir(parents=True)
    for i in range(3):
        (a.root / "Photos" / "2020" / f"p{i}.jpg").write_text(f"photo {i}\n")
    (a.root / "Photos" / "notes.txt").write_text("deleted, not moved\n")
    a("scan")
    (a.root / "Photos").rename(a.root / "Pictures")
    (a.root / "Pictures" / "notes.txt").unlink()
    a("scan")
    rows = [line.split(" ") for line in a("dump").stdout.splitlines() if not line.startswith("#")]
    order = [(r[0], r[3] == "D") for r in sorted(rows, key=lambda r: int(r[-1]))]
    changed = order[order.index(("Pictures", False)):]
    assert changed == [
        ("Pictures", False), ("Pictures/2020", False),
        ("Pictures/2020/p0.jpg", False), ("Photos/2020/p0.jpg", True),
        ("Pictures/2020/p1.jpg", False), ("Photos/2020/p1.jpg", True),
        ("Pictures/2020/p2.jpg", False), ("Photos/2020/p2.jpg", True),
        ("Photos/notes.txt", True), ("Photos/2020", True), ("Photos", True),
    ]


def test_a_file_renamed_to_a_name_the_walk_meets_first_is_deleted_once(tmp_path):
    """The walk finds the new name first, tombstones the old path then, and must not find the
    old path gone a second time (two deletions: a wrong count, a spurious event in the log)."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "zebra.txt").write_text("stripes\n")
    (a.root / "yak.txt").write_text("wool\n")
    a.sync(b)
    (a.root / "zebra.txt").rename(a.root / "antelope.txt")  # before the old name
    (a.root / "yak.txt").rename(a.root / "zz.txt")  # after it
    out = a("scan", "-v").stdout
    assert "a: 2 created, 0 updated, 2 deleted" in out
    assert out.count("delete  zebra.txt") == 1 and out.count("delete  yak.txt") == 1
    for old in ("zebra.txt", "yak.txt"):
        log = a("log", old).stdout
        assert log.count(" delete ") == 1, log
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert sorted(p.name for p in b.root.iterdir()) == ["antelope.txt", "zz.txt"]


def test_notes_that_name_odd_paths_stay_on_one_line(tmp_path):
    """`sync -v` and `log` print one line a step or event: the paths in their notes (moved
    from, moved to) are escaped as the paths themselves are."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "two\nlines.txt").write_text("odd name\n")
    a.sync(b)
    (a.root / "two\nlines.txt").rename(a.root / "back\\slash.txt")
    out = a.sync(b, "-v").stdout
    assert "b <- write   back\\\\slash.txt  [moved from two\\nlines.txt]" in out, out
    assert "b <- delete  two\\nlines.txt  [moved to back\\\\slash.txt]" in out, out
    assert all(line.startswith(("scan a: ", "b <- ", "a: ", "b: ")) for line in out.splitlines())
    log = b("log", "back\\slash.txt").stdout
    assert "[moved from two\\nlines.txt]" in log and len(log.splitlines()) == 3, log
    assert log.splitlines()[2] == "(its events before the move: repld log 'two\\nlines.txt')"
    assert snapshot(a.root) == snapshot(b.root)


def test_a_big_tree_moved_in_a_running_tree_is_renamed_on_the_peer(tmp_path):
    """More records than one page holds, and old paths that sort before the new ones: the
    peer still renames every file. (A page that ended between a file's new record and its old
    path's tombstone had the peer copy that file, then delete the original and keep it as a
    version: a trial saw moved files listed in `repld versions` as deleted.)"""
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        for d in range(12):
            (a.root / "Photos" / f"d{d}").mkdir(parents=True)
            for i in range(100):
                (a.root / "Photos" / f"d{d}" / f"{i}.jpg").write_text(f"{d} {i}\n")
        (a.root / "Photos" / "big.mkv").write_bytes(os.urandom(8 << 20))
        cluster.start()
        cluster.wait_converged(what="first contact")
        before = inodes(b.root / "Photos")

        (a.root / "Photos").rename(a.root / "Pictures")
        cluster.wait_converged(what="the move", timeout=60)
        assert not (b.root / "Photos").exists()
        after = inodes(b.root / "Pictures")
        assert after.keys() == before.keys()
        copied = [p for p in before if after[p] != before[p]]
        assert copied == [], copied
        assert b("versions").stdout.lower().startswith("no versions of any file kept")


def test_a_moved_directory_of_many_identical_files_is_renamed_whole(tmp_path):
    """A trial: with 9 or more files of one content, only the first 8 records with that hash
    were looked at for the moved file's guid, and the rest were copied and deleted (and kept
    as versions) instead of renamed."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "dups").mkdir()
    for i in range(12):
        (a.root / "dups" / f"c{i:02}").write_text("same\n")
    a.sync(b)
    before = inodes(b.root)
    (a.root / "dups").rename(a.root / "dups-renamed")
    out = a.sync(b).stdout
    assert "b: 0 files written (0 B, 0 from local copies), 12 moved" in out, out
    after = inodes(b.root)
    for i in range(12):
        assert after[f"dups-renamed/c{i:02}"] == before[f"dups/c{i:02}"]
    assert b("versions").stdout.lower().startswith("no versions of any file kept")  # none deleted


def test_files_the_watcher_recorded_at_once_are_renamed_by_a_peers_move(tmp_path):
    """A trial: files b's watcher had recorded within milliseconds of their writing carry a
    ctime that may be after the read; a's move of them fell back to a copy and a deletion
    (35 of 50 files). Now such a file is read once more, and renamed."""
    import time

    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        cluster.start()
        (b.root / "probe").mkdir()
        for i in range(30):
            (b.root / "probe" / f"p{i:02}").write_text(f"p {i} {os.urandom(8).hex()}\n")
            time.sleep(0.02)  # a program's own pace: each one recorded on its own
        cluster.wait_converged(what="b's files")
        before = inodes(b.root)
        (a.root / "probe").rename(a.root / "probe2")
        cluster.wait_until(lambda: not (b.root / "probe").exists(), 30, "the move to reach b")
        cluster.wait_converged(what="the move")
        after = inodes(b.root)
        copied = [i for i in range(30) if after[f"probe2/p{i:02}"] != before[f"probe/p{i:02}"]]
        assert not copied, f"copied instead of renamed: {copied}"


def test_a_subtree_sync_leaves_a_move_out_of_it_whole_for_a_full_sync(tmp_path):
    """A trial: `sync docs` after docs/x.txt moved to archive/ on a removed docs/x.txt on b
    and wrote nothing in its place (archive/ was not synced): the file was gone from b until a
    full sync. Now the removal waits for a sync that covers both ends, which renames it. (A
    move made since a's last whole scan is seen by the scan of docs alone as a deletion.)"""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "docs").mkdir()
    (a.root / "archive").mkdir()
    (a.root / "docs" / "x.txt").write_text("the report\n")
    (a.root / "docs" / "stays.txt").write_text("stays\n")
    a.sync(b)
    ino = (b.root / "docs" / "x.txt").stat().st_ino
    (a.root / "docs" / "x.txt").rename(a.root / "archive" / "x.txt")
    (a.root / "docs" / "new.txt").write_text("new in docs\n")
    a("scan")  # the move recorded as one (as a's daemon does at once)
    a.sync(b, "docs")
    assert (b.root / "docs" / "x.txt").read_text() == "the report\n"  # not taken away
    assert (b.root / "docs" / "new.txt").read_text() == "new in docs\n"  # the rest of docs came
    assert not (b.root / "archive" / "x.txt").exists()  # nothing outside docs
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root)
    assert (b.root / "archive" / "x.txt").stat().st_ino == ino  # renamed, not copied
