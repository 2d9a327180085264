"""Changes carried as a file (`repld export` / `repld import`) between replicas no network joins."""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import msgpack
from daemons import Cluster
from helpers import Rep, conflict_copies, files_bytes, make_replicas, snapshot
from repld.daemon.bundle import _digest
from repld.daemon.store import Store
from repld.protocol.messages import WIRE_VERSION, record_from_wire, record_to_wire
from test_sync import newer, populate, set_policy


def records_in(out: str) -> int:
    m = re.search(r"(\d+) records of", out)
    assert m, out
    return int(m.group(1))


def test_a_bundle_carries_the_tree_and_a_second_import_changes_nothing(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    (a.root / "empty").rmdir()
    (a.root / "empty").write_bytes(b"")  # a file of 0 bytes: no content to carry
    (a.root / "big.bin").write_bytes(os.urandom(3 * 2**20 + 123))  # several chunks in the bundle
    bundle = tmp_path / "a.bundle"
    a("export", bundle)
    assert bundle.stat().st_mode & 0o777 == 0o600  # it holds file content
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    out = b("import", bundle).stdout
    assert "0 conflicts" in out
    assert snapshot(a.root) == snapshot(b.root)
    dump = b("dump").stdout
    again = b("import", bundle).stdout
    assert "0 files written" in again
    assert b("dump").stdout == dump  # not one record touched


def test_a_dry_run_import_changes_nothing(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    (b.root / "docs").mkdir()
    (b.root / "docs" / "a.txt").write_text("b's own a.txt\n")
    bundle = tmp_path / "a.bundle"
    a("export", bundle)
    before = files_bytes(tmp_path)
    out = b("import", "--dry-run", bundle).stdout
    assert "dry run" in out and "run.sh" in out and "conflict" in out
    assert files_bytes(tmp_path) == before


def test_bundles_both_ways_settle_edits_deletes_and_conflicts_like_a_sync(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    first = tmp_path / "first.bundle"
    a("export", first)
    b("import", first)

    (a.root / "docs" / "a.txt").write_text("A's edit\n")
    (b.root / "docs" / "a.txt").write_text("B's later edit\n")
    newer(b.root / "docs" / "a.txt", than=a.root / "docs" / "a.txt")
    (b.root / "run.sh").unlink()  # deleted on b...
    (a.root / "run.sh").write_text("#!/bin/sh\necho edited on a\n")  # ...edited on a: kept
    (a.root / "docs" / "with space.txt").unlink()  # deleted on a only: must stay deleted
    to_b, to_a = tmp_path / "to-b.bundle", tmp_path / "to-a.bundle"
    a("export", to_b)  # a has heard nothing from b yet: everything
    b("export", "--since", "a", to_a)
    out = a("import", "-v", to_a).stdout
    # The conflict's line names the replicas, as sync -v does (it said "local wins").
    assert re.search(r"a <- .*docs/a\.txt.*\[conflict: b's version wins", out), out
    b("import", to_b)

    assert snapshot(a.root) == snapshot(b.root)
    copies = conflict_copies(a.root)
    assert len(copies) == 1 and copies == conflict_copies(b.root)
    assert (a.root / "docs" / "a.txt").read_text() == "B's later edit\n"
    assert (a.root / copies[0]).read_text() == "A's edit\n"
    assert (b.root / "run.sh").read_text() == "#!/bin/sh\necho edited on a\n"
    assert not (b.root / "docs" / "with space.txt").exists()

    # Another round brings nothing new: the resolutions agree, nothing comes back.
    for src, dst in ((a, b), (b, a)):
        again = tmp_path / f"again-{src.name}.bundle"
        src("export", "--since", dst.name, again)
        out = dst("import", again).stdout
        assert "0 files written" in out and "0 conflicts" in out and "0 deleted" in out
    assert snapshot(a.root) == snapshot(b.root)


def test_an_import_settles_conflicts_by_the_importers_conflict_policy(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "f.txt").write_text("v0\n")
    first = tmp_path / "first.bundle"
    a("export", first)
    b("import", first)
    (a.root / "f.txt").write_text("a's newer edit\n")
    (b.root / "f.txt").write_text("b's older edit\n")
    newer(a.root / "f.txt", than=b.root / "f.txt")
    set_policy(b, "newest")
    to_b = tmp_path / "to-b.bundle"
    a("export", to_b)
    b("import", to_b)
    assert (b.root / "f.txt").read_text() == "a's newer edit\n"
    assert conflict_copies(b.root) == []


def test_a_bundle_that_takes_a_directory_off_the_ignore_rules_brings_it(tmp_path):
    h, u = make_replicas(tmp_path, "h", "u")
    (h.root / ".repldignore").write_text("cache/\n")
    (h.root / "cache").mkdir()
    (h.root / "cache" / "a").write_text("important\n")
    first = tmp_path / "first.bundle"
    h("export", first)
    u("import", first)
    assert not (u.root / "cache").exists()
    (h.root / ".repldignore").write_text("")
    second = tmp_path / "second.bundle"
    h("export", second)
    u("import", second)
    assert (u.root / "cache" / "a").read_text() == "important\n"


def test_export_since_a_peer_leaves_out_what_its_bundles_showed_it_has(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    (a.root / "big.bin").write_bytes(os.urandom(2 * 2**20))
    full = tmp_path / "full.bundle"
    a("export", full)
    b("import", full)
    # b's next bundle tells a how far b has a's records.
    (b.root / "from-b.bin").write_bytes(os.urandom(2 * 2**20))
    back = tmp_path / "back.bundle"
    out = b("export", "--since", "a", back).stdout
    assert "1 files (2.0 MiB)" in out  # the content a sent is not sent back
    a("import", back)

    (a.root / "docs" / "a.txt").write_text("one small edit\n")
    small = tmp_path / "small.bundle"
    out = a("export", "--since", "b", small).stdout
    # The edit, and a's record of b's file (as a network sync relays it) without its content.
    assert records_in(out) == 2 and "1 files (15 B)" in out
    assert small.stat().st_size < 2**20
    b("import", small)
    assert snapshot(a.root) == snapshot(b.root)


def test_a_file_changed_after_its_scan_is_left_out_and_not_marked_as_seen(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    populate(a.root)
    a("scan")
    a_id = Store(a.state / "repld.db", write=False).replica_id
    (a.root / "docs" / "a.txt").write_text("changed, not scanned yet\n")
    bundle = tmp_path / "a.bundle"
    # With the database locked (as by a running daemon), export takes what is recorded.
    with Store(a.state / "repld.db"):
        proc = a("export", bundle, check=False)
    assert proc.returncode == 1
    assert "left out: docs/a.txt" in proc.stderr
    b("import", bundle)
    assert not (b.root / "docs" / "a.txt").exists()
    assert (b.root / "run.sh").exists()
    with Store(b.state / "repld.db", write=False) as store:
        recorded = store.peer_mark(a_id).seen_seq
    with Store(a.state / "repld.db", write=False) as store:
        a_seq = store.seq
    assert recorded < a_seq  # a network sync or the next bundle still brings docs/a.txt

    bundle2 = tmp_path / "a2.bundle"
    a("export", bundle2)  # scans now: the new content is recorded and carried
    b("import", bundle2)
    assert snapshot(a.root) == snapshot(b.root)


def test_bundles_that_do_not_belong_are_refused(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (tmp_path / "other").mkdir()
    (stranger,) = make_replicas(tmp_path / "other", "stranger")
    populate(a.root)
    bundle = tmp_path / "a.bundle"
    a("export", bundle)

    # The wrong file given: usage errors (2), as a missing one is.
    proc = stranger("import", bundle, check=False)
    assert proc.returncode == 2 and "another tree" in proc.stderr
    proc = a("import", bundle, check=False)
    assert proc.returncode == 2 and "exported by this replica" in proc.stderr
    proc = b("import", tmp_path / "a.toml", check=False)  # not even SQLite: the wrong file
    assert proc.returncode == 2 and "not a repld bundle" in proc.stderr
    assert "sqlite" not in proc.stderr.lower(), proc.stderr  # (it said "file is not a database")
    (tmp_path / "empty").write_bytes(b"")
    proc = b("import", tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "not a repld bundle" in proc.stderr
    proc = b("import", b.state / "repld.db", check=False)  # another SQLite database
    assert proc.returncode == 2 and "not a repld bundle" in proc.stderr
    proc = b("import", tmp_path / "missing.bundle", check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = a("export", a.root / "inside.bundle", check=False)
    assert proc.returncode == 2 and "inside the replicated tree" in proc.stderr
    assert not (a.root / "inside.bundle").exists()
    proc = a("export", "--since", "nobody", tmp_path / "x.bundle", check=False)
    assert proc.returncode == 2 and "nobody" in proc.stderr
    assert "only came through others is not known here by name" in proc.stderr, proc.stderr
    with Store(b.state / "repld.db"):
        proc = b("import", bundle, check=False)
    assert proc.returncode == 1 and "stop the daemon" in proc.stderr
    assert list(b.root.iterdir()) == []


def test_a_bundle_of_another_repld_version_is_refused_and_says_what_to_do(tmp_path):
    """A bundle read by a repld of another wire version: each side named one conflict copy its
    own way, and the trees differed for good (a trial: an upgrade done on one machine)."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "f.txt").write_text("content\n")
    good = tmp_path / "good.bundle"
    a("export", good)
    for name, sql in [
        ("older.bundle", "UPDATE meta SET value = '2' WHERE key = 'version'; "
                         "DELETE FROM meta WHERE key = 'wire'"),
        ("other-wire.bundle", f"UPDATE meta SET value = '{WIRE_VERSION - 1}' WHERE key = 'wire'"),
    ]:  # fmt: skip
        bad = tmp_path / name
        bad.write_bytes(good.read_bytes())
        db = sqlite3.connect(bad)
        db.executescript(sql)
        db.close()
        proc = b("import", bad, check=False)
        assert proc.returncode == 1, proc
        assert f"{bad}: made by another repld version" in proc.stderr, proc.stderr
        assert "`repld --version`" in proc.stderr and "export it again" in proc.stderr
        assert not (b.root / "f.txt").exists()
    b("import", good)
    assert (b.root / "f.txt").read_text() == "content\n"


def test_a_bundle_naming_a_path_outside_the_tree_writes_nothing_there(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "note.txt").write_text("harmless\n")
    bundle = tmp_path / "a.bundle"
    a("export", bundle)
    db = sqlite3.connect(bundle)
    seq, data = db.execute("SELECT seq, data FROM records WHERE path = 'note.txt'").fetchone()
    evil = record_from_wire(msgpack.unpackb(data)).with_(path="../escaped.txt")
    db.execute(
        "UPDATE records SET path = ?, data = ? WHERE seq = ?",
        ("../escaped.txt", msgpack.packb(record_to_wire(evil)), seq),
    )
    # Made on purpose, the digest is made again too (it finds damage; it is no signature).
    db.execute("UPDATE meta SET value = ? WHERE key = 'digest'", (_digest(db),))
    db.commit()
    db.close()
    proc = b("import", bundle, check=False)
    assert proc.returncode == 1 and "damaged record" in proc.stderr, proc.stderr
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path(b.root.parent / "escaped.txt").exists()


def test_export_while_the_daemon_runs_and_since_a_peer_it_synced_with(tmp_path):
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        populate(a.root)
        (a.root / "big.bin").write_bytes(os.urandom(2 * 2**20))
        cluster.start()
        cluster.wait_converged(what="initial sync")
        cluster.stop(b)
        # The daemon holds the database: export takes what it has recorded.
        (a.root / "docs" / "a.txt").write_text("edited while b is away\n")
        cluster.wait_until(
            lambda: " update " in a("log", "docs/a.txt").stdout, what="a to record the edit"
        )
        bundle = tmp_path / "while-running.bundle"
        out = a("export", "--since", "b", bundle).stdout
        # b acknowledged everything before the edit over the network: only the edit travels.
        assert records_in(out) == 1 and "1 files (23 B)" in out
        cluster.stop(a)
        b("import", bundle)
        assert (b.root / "docs" / "a.txt").read_text() == "edited while b is away\n"


def test_damaged_bundles_are_refused_without_a_traceback(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "f.txt").write_text("content\n")
    good = tmp_path / "good.bundle"
    a("export", good)

    def damaged(name: str, sql: str) -> Path:
        bad = tmp_path / name
        bad.write_bytes(good.read_bytes())
        db = sqlite3.connect(bad)
        db.execute(sql)
        db.commit()
        db.close()
        return bad

    cases = [
        damaged("text-content.bundle", "UPDATE content SET data = 'not bytes'"),
        damaged("no-seen.bundle", "DROP TABLE seen"),
        damaged("null-meta.bundle", "UPDATE meta SET value = 'x' WHERE key = 'since'"),
    ]
    truncated = tmp_path / "truncated.bundle"
    truncated.write_bytes(good.read_bytes()[:4096])
    cases.append(truncated)
    for bad in cases:
        proc = b("import", bad, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (bad, proc.stderr)
        assert str(bad) in proc.stderr, proc.stderr
        if bad is truncated:
            assert "a damaged bundle" in proc.stderr and "Copy it again" in proc.stderr
    assert not (b.root / "f.txt").exists()  # refused before anything was applied
    proc = a("export", a.state / "repld.db", check=False)  # its own database
    assert proc.returncode == 2 and "not a repld bundle" in proc.stderr
    assert "f.txt" in a("dump").stdout
    proc = a("export", a.state / "new.bundle", check=False)
    assert proc.returncode == 2 and "state directory" in proc.stderr
    proc = a("export", tmp_path / "no" / "such" / "dir.bundle", check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    other = tmp_path / "notes.toml"
    other.write_text("not a bundle\n")
    proc = a("export", other, check=False)
    assert proc.returncode == 2 and "is not a repld bundle" in proc.stderr
    assert other.read_text() == "not a bundle\n"
    stale = tmp_path / ".again.bundle.tmp-999999999"  # a killed export's leftover
    stale.write_bytes(b"half")
    a("export", tmp_path / "again.bundle")
    assert not stale.exists()


def test_a_bundle_cut_short_or_changed_is_refused_before_anything_is_applied(tmp_path):
    """A bundle a few bytes short, or with one byte of a file's content changed, was applied up
    to the damage (a trial: 43 files written, then an error), and its dry run found nothing
    wrong: the whole bundle is read and checked first now."""
    a, b = make_replicas(tmp_path, "a", "b")
    for i in range(40):
        (a.root / f"blob{i:02}.bin").write_bytes(os.urandom(20_000))
    good = tmp_path / "good.bundle"
    a("export", good)
    data = good.read_bytes()
    cases = {}
    for cut in (1, 100, 1000):
        cases[f"cut {cut}"] = tmp_path / f"cut{cut}.bundle"
        cases[f"cut {cut}"].write_bytes(data[:-cut])
    flipped = tmp_path / "flipped.bundle"
    flipped.write_bytes(data)
    db = sqlite3.connect(flipped)
    sha, blob = db.execute("SELECT sha256, data FROM content ORDER BY rowid DESC").fetchone()
    changed = bytes([blob[0] ^ 1]) + blob[1:]
    db.execute("UPDATE content SET data = ? WHERE sha256 = ?", (changed, sha))
    db.commit()
    db.close()
    cases["flipped"] = flipped
    # One value changed in a record or in meta, the file whole (a trial: a digit of `complete`
    # made the importer claim more of the exporter's records than it ever made, which stopped
    # the exporter with every peer; a record's mode changed was applied for good).
    for name, sql in [
        ("complete", "UPDATE meta SET value = value + 1000 WHERE key = 'complete'"),
        ("record", "UPDATE records SET data = CAST(data AS BLOB) || x'00' "
                   "WHERE seq = (SELECT MAX(seq) FROM records)"),
        ("seen", "INSERT OR REPLACE INTO seen VALUES ('someone', 99)"),
    ]:  # fmt: skip
        bad = tmp_path / f"{name}.bundle"
        bad.write_bytes(data)
        db = sqlite3.connect(bad)
        db.execute(sql)
        db.commit()
        db.close()
        cases[name] = bad
    for what, bad in cases.items():
        for dry in (["-n"], []):
            proc = b("import", *dry, bad, check=False)
            assert proc.returncode == 1, (what, dry, proc)
            assert f"{bad}: a damaged bundle" in proc.stderr, (what, proc.stderr)
            assert "Traceback" not in proc.stderr
        assert list(b.root.iterdir()) == [], what  # nothing applied
    b("import", good)
    assert len(list(b.root.iterdir())) == 40


def test_a_bundle_that_starts_after_what_the_importer_has_says_so(tmp_path):
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "one.txt").write_text("1\n")
    first = tmp_path / "first.bundle"
    a("export", first)
    b("import", first)
    back = tmp_path / "back.bundle"
    b("export", back)
    a("import", back)  # a now knows b has its records up to here
    (a.root / "two.txt").write_text("2\n")
    a("scan")
    # c, new, gets a bundle --since b: it lacks one.txt, which the bundle leaves out.
    (tmp_path / "c").mkdir()
    c = Rep("c", tmp_path / "c", tmp_path / "c.toml")
    c("init", c.root, "--name", "c", "--tree-id", a.tree_id())
    partial = tmp_path / "partial.bundle"
    a("export", "--since", "b", partial)
    proc = c("import", partial, check=False)
    assert proc.returncode == 1 and "incomplete" in proc.stderr and "--since c" in proc.stderr
    assert (c.root / "two.txt").exists() and not (c.root / "one.txt").exists()
    full = tmp_path / "full.bundle"
    a("export", full)
    c("import", full)
    assert (c.root / "one.txt").exists()


def test_an_old_bundle_brings_nothing_back_that_the_importer_had_already(tmp_path):
    """A bundle older than what the importer has of its exporter (a stick found in a drawer):
    its records up to the importer's mark were applied already, and may be older than what is
    there now, or than tombstones pruned since: taken again, deleted files came back."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "x.txt").write_text("to be deleted\n")
    (a.root / "kept.txt").write_text("v1\n")
    old = tmp_path / "old.bundle"
    a("export", old)
    a.sync(b)
    (a.root / "x.txt").unlink()
    (a.root / "kept.txt").write_text("v2\n")
    a.sync(b)
    for rep in (a, b):
        assert "dropped 1 tombstone" in rep("prune").stdout
    out = b("import", old, "-v").stdout
    assert "write" not in out, out
    assert not (b.root / "x.txt").exists() and (b.root / "kept.txt").read_text() == "v2\n"
    a.sync(b)
    assert snapshot(a.root) == snapshot(b.root) and not (a.root / "x.txt").exists()


def test_an_import_dry_run_says_a_moved_file_is_moved(tmp_path):
    """A trial: `import -n` listed a write and a delete, the import itself then reported the
    file moved (renamed, not copied, as a sync does)."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "cc.txt").write_text("a file to move\n")
    a.sync(b)
    (a.root / "cc.txt").rename(a.root / "cc-renamed.txt")
    bundle = tmp_path / "a.bundle"
    a("export", bundle)
    dry = b("import", "-n", bundle).stdout
    assert "cc-renamed.txt  [moved from cc.txt]" in dry, dry
    assert "delete" not in dry, dry
    out = b("import", bundle).stdout
    assert "1 moved" in out, out


def test_export_replaces_its_own_bundle_but_not_another_replicas(tmp_path):
    """A stick carries b's bundle to a: a's export to the same name must not destroy it."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "from-a.txt").write_text("a\n")
    (b.root / "from-b.txt").write_text("b\n")
    stick = tmp_path / "stick.bundle"
    b("export", stick)
    held = stick.read_bytes()
    proc = a("export", stick, check=False)
    assert proc.returncode == 2 and "exported by b" in proc.stderr and "--force" in proc.stderr
    assert stick.read_bytes() == held  # b's bundle is intact...
    a("import", stick)
    assert (a.root / "from-b.txt").read_text() == "b\n"  # ...and still does its job
    a("export", "--force", stick)
    assert "records of a" in a("export", stick).stdout  # a's own: replaced without --force
    b("import", stick)
    assert snapshot(a.root) == snapshot(b.root)


def test_a_bundle_made_for_another_replica_says_so_where_it_falls_short(tmp_path):
    """b's bundle for a (--since a) leaves out the content of a's own files; imported on c, it
    must say it was made for a and what to ask b for, not blame c."""
    a, b, c = make_replicas(tmp_path, "a", "b", "c")
    (a.root / "by-a.txt").write_text("written on a\n")
    to_b = tmp_path / "to-b.bundle"
    a("export", to_b)
    b("import", to_b)
    (b.root / "by-b.txt").write_text("written on b\n")
    for_a = tmp_path / "for-a.bundle"
    b("export", "--since", "a", for_a)
    proc = c("import", for_a, check=False)
    assert proc.returncode == 1
    assert (c.root / "by-b.txt").read_text() == "written on b\n"  # the rest applies
    assert "error: by-a.txt:" in proc.stderr and "made for (a)" in proc.stderr, proc.stderr
    assert "note: b made this bundle for a" in proc.stderr
    assert "without --since" in proc.stderr, proc.stderr
    whole = tmp_path / "whole.bundle"
    b("export", whole)
    assert c("import", whole).returncode == 0
    assert snapshot(c.root) == snapshot(b.root)
