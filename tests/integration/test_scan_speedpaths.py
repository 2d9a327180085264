"""The scanner's and the store's fast paths record exactly what the plain ones do.

- A whole walk records a new file straight from its directory entry (no lstat, no Record), and
  the store writes its rows from a thread (``Store.write_behind``) while reads of a directory
  whose rows this transaction did not touch go to a second connection: every read must still
  see every earlier write, a failed write must fail the transaction, a ``kill -9`` at any point
  must leave the database as it was before the scan or after it, and renames stay moves.
- ``hash_file_stat`` hashes a one-block file without an fstat first, a big file in blocks of its
  own size, and does not hang on a FIFO.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_replicas
from repld.daemon.scanner import Scanner, hash_file_stat
from repld.daemon.store import PAGE, Store
from repld.protocol.record import DIGEST_SIZE, MIN_BLOCK, block_size_for

FILES_PER_DIR = 70
DIRS = 40  # 2800 files: several batches of PAGE rows for the writer thread


def make_tree(root: Path) -> dict[str, bytes]:
    """Nested directories of small files (plus the odd sizes around one block), a symlink and an
    empty directory; returns every file's path and content."""
    files: dict[str, bytes] = {}
    for d in range(DIRS):
        sub = f"top{d % 4}/d{d:02}" + ("/deeper" if d % 3 == 0 else "")
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(FILES_PER_DIR):
            files[f"{sub}/f{i:03}.txt"] = f"{sub} {i}\n".encode() * (1 + i % 5)
    files["edge/empty"] = b""
    files["edge/one-block"] = os.urandom(MIN_BLOCK)
    files["edge/two-blocks"] = os.urandom(MIN_BLOCK + 1)
    (root / "edge").mkdir()
    (root / "edge" / "nothing-here").mkdir()
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    os.symlink("edge/empty", root / "link")
    assert len(files) > 2 * PAGE
    return files


def open_store(db: Path) -> Store:
    return Store(db) if db.exists() else Store.create(db)


def rows(store: Store) -> list[tuple[object, ...]]:
    """What a scan recorded, without what differs from scan to scan (guids, times, seq)."""
    return sorted(
        store.execute(
            "SELECT path, parent, kind, version != '', deleted, mode, mtime_ns, size, sha256, "
            "blocks, target, action, ino FROM records"
        ).fetchall()
    )


def block_digests(data: bytes) -> bytes:
    bs = block_size_for(len(data))
    if not data:
        return hashlib.sha256(b"").digest()
    return b"".join(hashlib.sha256(data[i : i + bs]).digest() for i in range(0, len(data), bs))


def test_whole_walk_records_what_path_scans_record(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    files = make_tree(root)

    whole = open_store(tmp_path / "whole" / "repld.db")
    stats = Scanner(whole, root).scan()  # whole walk: fast paths, write-behind
    # The same tree scanned path by path (no fast path, no writer thread) for comparison.
    by_path = open_store(tmp_path / "by-path" / "repld.db")
    Scanner(by_path, root).scan(sorted(os.listdir(root)))
    assert rows(whole) == rows(by_path)

    everything = {
        (Path(d) / name).relative_to(root).as_posix()
        for d, dirs, names in os.walk(root)
        for name in dirs + names
    }
    recorded = {r[0]: r for r in rows(whole)}
    assert recorded.keys() == everything
    assert (stats.created, stats.files, stats.errors) == (len(everything), len(files), [])
    for rel, data in files.items():
        r = recorded[rel]
        assert r[7] == len(data) and r[8] == hashlib.sha256(data).hexdigest(), rel
        assert r[9] == block_digests(data), rel
        assert r[12] == (root / rel).stat().st_ino
    # One history row per record, sequence numbers 1..n, and the committed seq says n.
    n = whole.execute("SELECT count(*) FROM records").fetchone()[0]
    assert whole.execute("SELECT count(*), min(seq), max(seq) FROM history").fetchone() == (
        n, 1, n
    )
    assert sorted(s for (s,) in whole.execute("SELECT seq FROM records")) == list(range(1, n + 1))
    assert whole.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone() == (str(n),)
    assert whole.seq == whole.committed_seq == n

    # Nothing changed: a rescan records nothing.
    assert Scanner(whole, root).scan().events == 0
    whole.close()
    by_path.close()


def test_reads_inside_write_behind_see_every_earlier_write(tmp_path):
    store = Store.create(tmp_path / "repld.db")
    v = f"{store.replica_id}:1"

    def put(path: str) -> None:
        store.put_local(path, "g-" + path, "file", v, "create", 0o644, 1, 1, "ab", b"x", 7)

    with store.transaction():
        for i in range(5):
            put(f"old/f{i}")
    with store.transaction(), store.write_behind():
        for i in range(3 * PAGE + 17):  # whole batches handed to the thread, and a partial one
            put(f"new/f{i:05}")
        # A directory this transaction wrote to: the read waits for the writer.
        assert len(store.children("new")) == 3 * PAGE + 17
        assert store.get("new/f00000") is not None
        assert store.get(f"new/f{3 * PAGE + 16:05}") is not None
        # One it did not: read from the last commit, on the second connection.
        assert sorted(r.path for r in store.children("old")) == [f"old/f{i}" for i in range(5)]
        assert store._reader is not None
        put("old/f9")  # now it did: this read waits, and sees the new row
        assert len(store.children("old")) == 6
        store.set_ino("new/f00001", 99)
        assert store.get("new/f00001").ino == 99  # type: ignore[union-attr]
        assert store.execute("SELECT count(*) FROM records").fetchone() == (3 * PAGE + 17 + 6,)
        for i in range(PAGE + 5):
            put(f"more/f{i:05}")
        # Raw SQL that may write: from then on no read goes around the writer.
        store.execute("UPDATE records SET mode = 384 WHERE path = 'old/f0'")
        assert store._tx_parents is None
        assert len(store.children("more")) == PAGE + 5
    assert store._writer is None and store._reader is None
    assert store.execute("SELECT count(*) FROM history").fetchone() == (3 * PAGE + 17 + 6 + PAGE
                                                                       + 5,)  # fmt: skip
    store.close()


def test_a_failed_background_write_fails_and_rolls_back_the_transaction(tmp_path):
    store = Store.create(tmp_path / "repld.db")
    v = f"{store.replica_id}:1"
    with store.transaction():
        store.put_local("kept", "g", "file", v, "create", 0o644, 1, 1, "ab", b"x", 7)
    before = (store.seq, store.execute("SELECT count(*) FROM records").fetchone())
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction(), store.write_behind():
            for i in range(PAGE - 1):
                store.put_local(f"a/f{i}", "g", "file", v, "create", 0o644, 1, 1, "ab", b"", 7)
            store.put_local("a/bad", "g", "file", v, "create", 0o644, 1, 1, None, b"", 7)  # type: ignore[arg-type]
            for i in range(3 * PAGE):  # goes on: the error comes at a put, a read or the commit
                store.put_local(f"b/f{i}", "g", "file", v, "create", 0o644, 1, 1, "ab", b"", 7)
    assert (store.seq, store.execute("SELECT count(*) FROM records").fetchone()) == before
    assert store.execute("SELECT count(*) FROM history").fetchone() == (1,)
    with store.transaction():  # the store is usable again
        store.put_local("next", "g", "file", v, "create", 0o644, 1, 1, "ab", b"x", 7)
    assert store.committed_seq == before[0] + 1
    store.close()


KILLER = """
import os, signal, sys
from pathlib import Path
from repld.daemon.store import Store
from repld.daemon.scanner import Scanner

db, root, after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
store = Store(db) if db.exists() else Store.create(db)
dirs = 0

def progress(stats):
    global dirs
    dirs += 1
    if dirs == after:  # mid-walk: batches written, one maybe being written, more buffered
        os.kill(os.getpid(), signal.SIGKILL)

Scanner(store, root, progress=progress).scan()
"""


def scan_killed_after(db: Path, root: Path, dirs: int) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, str(db), str(root), str(dirs)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def committed(db: Path) -> tuple[object, ...]:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        meta_seq = int(con.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
        recs = con.execute("SELECT path, sha256, seq FROM records ORDER BY path").fetchall()
        hist = con.execute("SELECT count(*), coalesce(max(seq), 0) FROM history").fetchone()
    finally:
        con.close()
    assert meta_seq == max((r[2] for r in recs), default=0) == hist[1]
    return meta_seq, recs, hist


@pytest.mark.parametrize("after", [1, 12, 30])
def test_kill_9_during_a_scan_leaves_the_database_before_or_after_it(tmp_path, after):
    root = tmp_path / "root"
    root.mkdir()
    files = make_tree(root)
    db = tmp_path / "state" / "repld.db"
    db.parent.mkdir()
    Store.create(db).close()

    scan_killed_after(db, root, after)  # the first scan never committed: nothing recorded
    assert committed(db) == (0, [], (0, 0))
    store = Store(db)
    Scanner(store, root).scan()
    store.close()
    done = committed(db)
    assert len(done[1]) > len(files)

    changed = list(files)[::2]  # half the files grow
    for rel in changed:
        with open(root / rel, "ab") as f:
            f.write(b"more\n")
    scan_killed_after(db, root, after)
    assert committed(db) == done
    store = Store(db)
    stats = Scanner(store, root).scan()
    store.close()
    assert (stats.updated, stats.events) == (len(changed), len(changed))
    assert committed(db)[0] == done[0] + len(changed)


def test_renames_in_a_whole_walk_are_moves(tmp_path):
    (a,) = make_replicas(tmp_path, "a")
    for d in ("a-first", "m-middle", "z-last"):
        (a.root / d).mkdir()
    data = {name: os.urandom(5000) for name in ("one", "two", "three")}
    (a.root / "a-first" / "one").write_bytes(data["one"])
    (a.root / "z-last" / "two").write_bytes(data["two"])
    (a.root / "m-middle" / "sub").mkdir()
    (a.root / "m-middle" / "sub" / "three").write_bytes(data["three"])
    for i in range(3 * PAGE):  # enough rows for the writer thread to have work
        (a.root / "m-middle" / f"filler{i:05}").write_text(str(i))
    a("scan")

    def guid(path: str) -> str:
        for line in a("dump").stdout.splitlines():
            fields = line.split(" ")
            if fields[0] == path:
                return fields[-2]
        raise AssertionError(f"{path}: no record")

    before = {p: guid(p) for p in ("a-first/one", "z-last/two", "m-middle/sub/three")}
    # A move to a directory walked after the old one, one to a directory walked before it,
    # and a moved directory, each along with many new files.
    os.rename(a.root / "a-first" / "one", a.root / "z-last" / "one")
    os.rename(a.root / "z-last" / "two", a.root / "a-first" / "two")
    os.rename(a.root / "m-middle" / "sub", a.root / "z-last" / "sub")
    for i in range(2 * PAGE):
        (a.root / "a-first" / f"new{i:05}").write_text(f"new {i}")
    a("scan")
    for old, new in (("a-first/one", "z-last/one"), ("z-last/two", "a-first/two"),
                     ("m-middle/sub/three", "z-last/sub/three")):  # fmt: skip
        assert guid(new) == before[old]
        assert f"moved from {old}" in a("log", new).stdout
        assert "delete" in a("log", old).stdout


def test_hash_file_stat_block_sizes_and_fifo(tmp_path):
    for size in (0, 1, MIN_BLOCK - 1, MIN_BLOCK, MIN_BLOCK + 1, 3 * MIN_BLOCK + 5):
        p = tmp_path / f"f{size}"
        data = os.urandom(size)
        p.write_bytes(data)
        sha, blocks, got, st = hash_file_stat(p)
        assert (sha, blocks, got, st.st_size) == (
            hashlib.sha256(data).hexdigest(), block_digests(data), size, size
        )
    # Big enough for a block size above the smallest: sparse, so cheap to make and read.
    big = tmp_path / "big"
    size = MIN_BLOCK * 2000 + 3 * MIN_BLOCK + 11
    with open(big, "wb") as f:
        f.truncate(size)
    bs = block_size_for(size)
    assert bs > MIN_BLOCK
    sha, blocks, got, _ = hash_file_stat(big)
    full, rest = divmod(size, bs)
    assert got == size and len(blocks) == (full + 1) * DIGEST_SIZE
    assert blocks == hashlib.sha256(bytes(bs)).digest() * full + hashlib.sha256(
        bytes(rest)
    ).digest()
    whole = hashlib.sha256()
    for _ in range(full):
        whole.update(bytes(bs))
    whole.update(bytes(rest))
    assert sha == whole.hexdigest()
    # A FIFO (say one that took a file's place after the directory was read) does not block.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(hash_file_stat(fifo)[3].st_mode)


def test_a_file_written_while_it_is_hashed_is_read_again(tmp_path, monkeypatch):
    """Recorded with the stat taken after reading, a hash of half-old, half-new content would
    pass for the final version and never be read again (found with a 50 MiB file rewritten
    in place while the daemon hashed it)."""
    from repld.daemon import scanner

    f = tmp_path / "busy.bin"
    f.write_bytes(b"a" * 300_000)
    real = scanner._hash_fd
    calls = []

    def hash_then_write(fd: int, bsize: int):  # type: ignore[no-untyped-def]
        out = real(fd, bsize)
        if not calls:
            with open(f, "r+b") as w:  # a writer, between our read and our fstat
                w.seek(1000)
                w.write(b"NEW")
            os.utime(f, ns=(1, f.stat().st_mtime_ns + 10_000_000))
        calls.append(out[0])
        return out

    monkeypatch.setattr(scanner, "_hash_fd", hash_then_write)
    sha, _, size, st = hash_file_stat(f)
    assert len(calls) == 2  # read again
    assert sha == hashlib.sha256(f.read_bytes()).hexdigest() and size == 300_000
    assert st.st_mtime_ns == f.stat().st_mtime_ns


def test_a_path_scan_of_a_removed_tree_reads_its_records_once(tmp_path, monkeypatch):
    """`rm -rf d` gives the watcher every file of d: each one finds d gone. Listing d's records
    for each of them made a 3,000-file `rm -rf` take the daemon a minute (quadratic); the
    subtree is listed once, and every path gets its tombstone, children before d."""
    root = tmp_path / "root"
    (root / "d" / "sub").mkdir(parents=True)
    paths = [f"d/f{i:04}" for i in range(300)] + [f"d/sub/g{i:03}" for i in range(100)]
    for p in paths:
        (root / p).write_text(p)
    (root / "keep").write_text("keep")
    store = open_store(tmp_path / "db" / "repld.db")
    Scanner(store, root).scan()
    for p in paths:
        (root / p).unlink()
    (root / "d" / "sub").rmdir()
    (root / "d").rmdir()

    listed: list[str] = []
    real = Store.iter_paths

    def counting(self, prefix, *a, **kw):
        listed.append(prefix)
        return real(self, prefix, *a, **kw)

    monkeypatch.setattr(Store, "iter_paths", counting)
    stats = Scanner(store, root).scan([*paths, "d/sub", "d"])
    assert listed.count("d") == 1, listed[:5]
    gone = {r[0] for r in rows(store) if r[4] == 1}
    assert gone == {*paths, "d", "d/sub"} and stats.deleted == len(paths) + 2
    order = [p for (p,) in store.execute("SELECT path FROM history WHERE action = 'delete' "
                                         "ORDER BY seq")]  # fmt: skip
    assert order.index("d/sub/g000") < order.index("d/sub") < order.index("d")
    assert store.get("keep") is not None and not store.get("keep").deleted
    store.close()
