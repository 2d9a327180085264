"""The one-shot sync's fast paths change nothing a sync promises.

- The applier makes a full batch's data durable (syncfs) on a thread while it writes the next
  batch, and installs it after: a file that appears where a new one goes is still never
  overwritten, every thread it starts is joined and every descriptor closed, also when applying
  stops on an error, and nothing under a real name lacks its record.
- A batch of a few big files (full by bytes) is flushed file by file on that thread while the
  next file is written, still before it gets its name; a flush that fails costs that file only.
- ``Store.read_ahead`` answers ``get`` and ``live_with_hash`` from one read of a page: always
  what the database would say, after writes, a rollback or a cache refresh of the inode.
- A rescan compares each entry with a short form of its record first: every kind of change is
  still recorded, exactly as a scan from nothing records the tree.
- New files from a replica on this machine are copied by a second process (copyproc): what it
  writes is checked the same way, a file it could not copy is copied by the applier (which
  reports why, if it fails too), and nothing of it is left behind (process, descriptors).
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import threading
from pathlib import Path
from typing import BinaryIO

import pytest
from helpers import make_replicas
from repld.daemon import applier as applier_mod
from repld.daemon.applier import Applier
from repld.daemon.copyproc import CopyProcess
from repld.daemon.localsync import _opener
from repld.daemon.replica import open_replica
from repld.daemon.scanner import Scanner
from repld.daemon.store import Store
from repld.protocol.plan import plan_pull, plan_record
from repld.protocol.record import Kind, Record
from repld.protocol.version import VersionVector

BATCH = 12  # files per batch in these tests: more than SMALL_BATCH, so batches are pipelined


def syncfs_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "repld-sync"]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def write_files(root: Path, n: int) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        rel = f"d{i % 3}/f{i:03}.bin"
        (root / rel).parent.mkdir(exist_ok=True)
        files[rel] = data = os.urandom(100 + i)
        (root / rel).write_bytes(data)
    return files


class Copiers:
    """Runs an Applier copying new files itself (``here``) or by the copy process from the
    first file on (``process``); ``started`` lists the copy processes it made."""

    def __init__(self, where: str, monkeypatch: pytest.MonkeyPatch):
        self.where = where
        self.started: list[CopyProcess] = []
        if where == "process":
            monkeypatch.setattr(applier_mod, "COPY_PROCESS_AFTER", 0)
            started = self.started

            class Spy(CopyProcess):
                def __init__(self) -> None:
                    super().__init__()
                    started.append(self)

            monkeypatch.setattr(applier_mod, "CopyProcess", Spy)

    def applier(self, into, source, **kw) -> Applier:
        root = str(source.root) if self.where == "process" else None
        return Applier(into.store, into.root, _opener(source), source_root=root, **kw)

    def check_used(self) -> None:
        """The copy process ran if it was to, and is gone (reaped)."""
        assert len(self.started) == (self.where == "process")
        for proc in self.started:
            with pytest.raises(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)


@pytest.fixture(params=["here", "process"])
def copiers(request, monkeypatch) -> Copiers:
    return Copiers(request.param, monkeypatch)


def recorded_on_disk(root: Path, store: Store) -> None:
    """Every file under a real name has a live record that says what is there."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            rec = store.get(rel)
            assert rec is not None and not rec.deleted, rel
            st = p.lstat()
            assert (rec.size, rec.mtime_ns, rec.ino) == (st.st_size, st.st_mtime_ns, st.st_ino), rel
            assert rec.sha256 == hashlib.sha256(p.read_bytes()).hexdigest(), rel


def test_files_appearing_where_new_ones_go_are_kept_across_pipelined_batches(
    tmp_path, monkeypatch, copiers
):
    monkeypatch.setattr(applier_mod, "BATCH_FILES", BATCH)
    a, b = make_replicas(tmp_path, "a", "b")
    files = write_files(a.root, 5 * BATCH + 5)
    a("scan")
    b("scan")
    fds = open_fds()
    with open_replica(b.config) as rb, open_replica(a.config, write=False) as ra:
        steps = list(plan_pull(rb.store.get, ra.store.records_since(0),
                               replica=rb.store.replica_id))  # fmt: skip
        # Meanwhile files nobody has recorded appear where new ones are to go: in the first
        # batch, and in one that is staged while the batch before it is made durable.
        for rel in ("d0/f000.bin", "d1/f040.bin"):
            (b.root / rel).parent.mkdir(exist_ok=True)
            (b.root / rel).write_bytes(b"unrecorded on b\n")

        def replan(step):
            rb.scan([step.path])
            return plan_record(rb.store.get(step.path), ra.store.get(step.path),
                               replica=rb.store.replica_id, local_lookup=rb.store.get)  # fmt: skip

        stats = copiers.applier(rb, ra, replan=replan).apply(steps)
        assert stats.errors == []
        assert stats.conflicts == 2
        recorded_on_disk(b.root, rb.store)
    assert syncfs_threads() == [] and open_fds() == fds
    copiers.check_used()
    for rel, data in files.items():
        copies = [p.read_bytes() for p in (b.root / rel).parent.glob(Path(rel).stem + "*")]
        assert data in copies, rel
        if rel in ("d0/f000.bin", "d1/f040.bin"):
            assert b"unrecorded on b\n" in copies, rel
        else:
            assert copies == [data], rel
    assert not list(b.root.rglob(".repld-tmp-*"))


def test_a_source_that_changed_since_its_record_is_checked_by_hash(tmp_path, copiers):
    """Only what the record says is read, and its hash checked: a file rewritten since is not
    written (the next sync takes it); one that only grew gives the bytes its record has."""
    a, b = make_replicas(tmp_path, "a", "b")
    (a.root / "rewritten").write_bytes(b"recorded\n")
    (a.root / "grown").write_bytes(b"recorded\n")
    (a.root / "shrunk").write_bytes(b"recorded\n")
    a("scan")
    (a.root / "rewritten").write_bytes(b"REWRITTEN")  # the same size, other bytes
    with open(a.root / "grown", "ab") as f:
        f.write(b"and more since\n")
    (a.root / "shrunk").write_bytes(b"rec")
    with open_replica(b.config) as rb, open_replica(a.config, write=False) as ra:
        steps = plan_pull(rb.store.get, ra.store.records_since(0), replica=rb.store.replica_id)
        stats = copiers.applier(rb, ra).apply(steps)
        assert sorted(path for path, _ in stats.errors) == ["rewritten", "shrunk"]
        assert all("does not match its record" in e for _, e in stats.errors)
        assert sorted(stats.stale_sources) == ["rewritten", "shrunk"]
        recorded_on_disk(b.root, rb.store)
    assert sorted(os.listdir(b.root)) == ["grown"]
    assert (b.root / "grown").read_bytes() == b"recorded\n"
    copiers.check_used()


def test_when_the_copy_process_dies_the_applier_copies_the_rest_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(applier_mod, "BATCH_FILES", BATCH)
    monkeypatch.setattr(applier_mod, "COPY_PROCESS_AFTER", 0)
    a, b = make_replicas(tmp_path, "a", "b")
    files = write_files(a.root, 4 * BATCH)
    a("scan")
    killed = []

    class Doomed(CopyProcess):
        def submit(self, *job):  # killed once a batch and a half is handed to it
            n = super().submit(*job)
            if n == BATCH + BATCH // 2:
                os.kill(self.pid, signal.SIGKILL)
                killed.append(self.pid)
            return n

    monkeypatch.setattr(applier_mod, "CopyProcess", Doomed)
    fds = open_fds()
    with open_replica(b.config) as rb, open_replica(a.config, write=False) as ra:
        steps = plan_pull(rb.store.get, ra.store.records_since(0), replica=rb.store.replica_id)
        stats = Applier(rb.store, rb.root, _opener(ra), source_root=str(a.root)).apply(steps)
        assert stats.errors == [] and stats.written == len(files)
        recorded_on_disk(b.root, rb.store)
    assert len(killed) == 1 and open_fds() == fds
    with pytest.raises(ChildProcessError):
        os.waitpid(killed[0], os.WNOHANG)
    for rel, data in files.items():
        assert (b.root / rel).read_bytes() == data, rel


def test_the_copy_process_takes_paths_near_the_length_limit(tmp_path):
    """Jobs are sent many to a message: paths of some 4,000 bytes must not overflow one."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    deep = Path(*["d" * 200] * 19)  # 3,819 bytes below each root
    (src / deep).mkdir(parents=True)
    (dst / deep).mkdir(parents=True)
    files = {f"{i:02}": os.urandom(i * 100) for i in range(40)}
    for name, data in files.items():
        (src / deep / name).write_bytes(data)
    proc = CopyProcess()
    try:
        jobs = {name: proc.submit(os.fsencode(src / deep / name), os.fsencode(dst / deep),
                                  len(data), hashlib.sha256(data).hexdigest(), 0o640, 10**18)
                for name, data in files.items()}  # fmt: skip
        for name, job in jobs.items():
            fd = proc.take(job)
            assert fd is not None, name  # (None: the process failed or was lost)
            os.link(f"/proc/self/fd/{fd}", dst / deep / name, src_dir_fd=fd, follow_symlinks=True)
            os.close(fd)
    finally:
        proc.close()
    for name, data in files.items():
        st = (dst / deep / name).stat()
        assert (dst / deep / name).read_bytes() == data
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 10**18)


def test_a_directory_gone_meanwhile_fails_its_file_not_unnamed_files(tmp_path):
    """A target directory removed while the sync runs costs its files only: the tree keeps
    its unnamed temporary files (and the copy process)."""
    a, b = make_replicas(tmp_path, "a", "b")
    with open_replica(b.config) as rb, open_replica(a.config, write=False) as ra:
        applier = Applier(rb.store, rb.root, _opener(ra))
        rec = Record("gone/f.txt", "g", Kind.FILE, VersionVector(), size=0,
                     sha256=hashlib.sha256(b"").hexdigest())  # fmt: skip
        with pytest.raises(FileNotFoundError):
            applier._write_unnamed(rec, io.BytesIO(b""), False)
        assert applier._unnamed_ok


class Boom(Exception):
    pass


def test_an_error_while_applying_joins_threads_closes_descriptors_and_leaves_records_true(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(applier_mod, "BATCH_FILES", BATCH)
    a, b = make_replicas(tmp_path, "a", "b")
    write_files(a.root, 4 * BATCH)
    a("scan")
    b("scan")
    fds = open_fds()
    with open_replica(b.config) as rb, open_replica(a.config, write=False) as ra:
        fetch = _opener(ra)
        count = 0

        def failing_fetch(rec: Record) -> BinaryIO:
            nonlocal count
            count += 1
            if count == 2 * BATCH + 3:  # a batch in flight, the next one half written
                raise Boom("the source went away")
            return fetch(rec)

        steps = plan_pull(rb.store.get, ra.store.records_since(0), replica=rb.store.replica_id)
        with pytest.raises(Boom):
            Applier(rb.store, rb.root, failing_fetch).apply(steps)
        assert syncfs_threads() == []
        recorded_on_disk(b.root, rb.store)
        written = [p for p in b.root.rglob("*.bin")]
        assert 0 < len(written) < 4 * BATCH
    assert open_fds() == fds
    a.sync(b)  # the next sync brings the rest
    with open_replica(b.config) as rb:
        recorded_on_disk(b.root, rb.store)
    assert len(list(b.root.rglob("*.bin"))) == 4 * BATCH


def content_of(fd: int | None, path: Path | None) -> bytes:
    """What a temporary file holds: an unnamed one (open write-only) is read through /proc."""
    return Path(f"/proc/self/fd/{fd}" if fd is not None else str(path)).read_bytes()


def big_files(tmp_path, monkeypatch, n):
    """Replicas a (with ``n`` files) and b (empty), scanned; every file fills a batch."""
    monkeypatch.setattr(applier_mod, "BATCH_BYTES", 1000)
    a, b = make_replicas(tmp_path, "a", "b")
    files = {f"big{i}": os.urandom(3000 + i) for i in range(n)}
    for name, data in files.items():
        (a.root / name).write_bytes(data)
    a("scan")
    b("scan")
    return a, b, files


def test_few_big_files_are_flushed_while_the_next_is_written_and_before_their_names(
    tmp_path, monkeypatch
):
    a, b, files = big_files(tmp_path, monkeypatch, 4)
    opened: list[str] = []
    second_opened = threading.Event()
    flushed: list[tuple[str, bool]] = []  # (file, whether its name existed yet)
    overlapped: list[bool] = []
    real_fdatasync = applier_mod._fdatasync

    def fdatasync(fd, path):
        name = next(n for n, d in files.items() if d == content_of(fd, path))
        if name == "big0":
            # Flushing the first file must not hold up writing the next one.
            overlapped.append(second_opened.wait(timeout=5))
        flushed.append((name, (b.root / name).exists()))
        real_fdatasync(fd, path)

    monkeypatch.setattr(applier_mod, "_fdatasync", fdatasync)
    fds = open_fds()
    with open_replica(b.config) as rb, open_replica(a.config, write=False) as ra:
        fetch = _opener(ra)

        def recording_fetch(rec: Record) -> BinaryIO:
            opened.append(rec.path)
            if len(opened) == 2:
                second_opened.set()
            return fetch(rec)

        steps = plan_pull(rb.store.get, ra.store.records_since(0), replica=rb.store.replica_id)
        stats = Applier(rb.store, rb.root, recording_fetch).apply(steps)
        assert stats.errors == [] and stats.written == 4
        recorded_on_disk(b.root, rb.store)
    assert overlapped == [True]
    assert sorted(flushed) == [(name, False) for name in sorted(files)]  # all, before the name
    assert {n: (b.root / n).read_bytes() for n in files} == files
    assert syncfs_threads() == [] and open_fds() == fds


def test_a_flush_that_fails_on_the_thread_costs_that_file_only(tmp_path, monkeypatch):
    a, b, files = big_files(tmp_path, monkeypatch, 3)
    real_fdatasync = applier_mod._fdatasync

    def fdatasync(fd, path):
        if content_of(fd, path) == files["big1"]:
            raise OSError(5, "Input/output error")
        real_fdatasync(fd, path)

    monkeypatch.setattr(applier_mod, "_fdatasync", fdatasync)
    fds = open_fds()
    with open_replica(b.config) as rb, open_replica(a.config, write=False) as ra:
        steps = plan_pull(rb.store.get, ra.store.records_since(0), replica=rb.store.replica_id)
        stats = Applier(rb.store, rb.root, _opener(ra)).apply(steps)
        assert [(path, "Input/output error" in e) for path, e in stats.errors] == [("big1", True)]
        recorded_on_disk(b.root, rb.store)
        assert rb.store.get("big1") is None
    assert sorted(os.listdir(b.root)) == ["big0", "big2"]
    assert syncfs_threads() == [] and open_fds() == fds
    monkeypatch.setattr(applier_mod, "_fdatasync", real_fdatasync)
    a.sync(b)  # the next sync brings it
    assert (b.root / "big1").read_bytes() == files["big1"]


def _file(store: Store, path: str, sha: str, *, deleted: bool = False) -> Record:
    return Record(path, "g-" + path, Kind.FILE, VersionVector().bump(store.replica_id),
                  deleted=deleted, mode=0o644, mtime_ns=1, size=3, sha256=sha, ino=7)  # fmt: skip


def test_read_ahead_answers_what_the_database_says(tmp_path):
    store = Store.create(tmp_path / "repld.db")
    with store.transaction():
        store.put(_file(store, "a", "h1"), local=True)
        store.put(_file(store, "gone", "h2", deleted=True), local=True)

    def fresh(path: str) -> Record | None:
        row = store.execute("SELECT path FROM records WHERE path = ?", (path,)).fetchone()
        return None if row is None else store.get(path)

    paths = ["a", "gone", "b", "c", "d"]
    store.read_ahead(paths, ["h1", "h2", "h3", "h4", ""])
    assert [r.path if r else None for r in map(store.get, paths)] == ["a", "gone", None, None,
                                                                       None]  # fmt: skip
    assert [r.path for r in store.live_with_hash("h1")] == ["a"]
    assert store.live_with_hash("h2") == [] and store.live_with_hash("h3") == []
    with store.transaction():
        store.put(_file(store, "b", "h3"), local=True)  # a change: what was read is read again
    assert store.get("b") is not None and store.get("b").sha256 == "h3"  # type: ignore[union-attr]
    assert [r.path for r in store.live_with_hash("h3")] == ["b"]
    with store.transaction():
        store.put(_file(store, "c", "h4"), local=True)  # a second one: asked one at a time
    assert store.get("c") is not None and [r.path for r in store.live_with_hash("h4")] == ["c"]
    store.read_ahead(paths, ["h1", "h3", "h4", "h5"])
    with store.transaction(commit=False):  # rolled back: the read answers no longer stand
        store.put(_file(store, "d", "h5"), local=True)
        assert store.get("d") is not None and store.live_with_hash("h5") != []
    assert store.get("d") is None and store.live_with_hash("h5") == []
    store.read_ahead(paths)
    with store.transaction():
        store.set_ino("a", 99)
    assert store.get("a").ino == 99  # type: ignore[union-attr]
    for path in paths:
        assert store.get(path) == fresh(path)
    store.close()


def rows(store: Store) -> list[tuple[object, ...]]:
    return sorted(
        store.execute(
            # A directory's mtime is recorded when it is, and left alone while only its
            # entries change.
            "SELECT path, kind, deleted, mode, CASE kind WHEN 'dir' THEN 0 ELSE mtime_ns END, "
            "size, sha256, blocks, target, ino FROM records WHERE deleted = 0"
        ).fetchall()
    )


def test_a_rescan_records_every_change_among_unchanged_entries(tmp_path):
    root = tmp_path / "root"
    for d in ("x", "y", "z", "x/sub"):
        (root / d).mkdir(parents=True)
    for d in ("x", "y", "z", "x/sub"):
        for i in range(20):
            (root / d / f"f{i:02}").write_bytes(f"{d} {i}\n".encode())
    os.symlink("f00", root / "x" / "link")
    store = Store.create(tmp_path / "s" / "repld.db")
    Scanner(store, root).scan()

    (root / "x" / "f01").write_bytes(b"longer content now\n")  # size
    st = (root / "x" / "f02").stat()
    os.utime(root / "x" / "f02", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # mtime
    (root / "x" / "f03").chmod(0o600)  # mode
    (root / "y").chmod(0o700)  # a directory's mode
    (root / "x" / "f04").unlink()  # gone
    (root / "x" / "f05").unlink()
    (root / "x" / "f05").mkdir()  # a file became a directory
    (root / "x" / "f05" / "inner").write_bytes(b"in\n")
    for p in (root / "x" / "sub").iterdir():
        p.unlink()
    (root / "x" / "sub").rmdir()
    (root / "x" / "sub").write_bytes(b"a directory became a file\n")
    (root / "x" / "link").unlink()
    os.symlink("f06", root / "x" / "link")  # another target
    (root / "z" / "f07").rename(root / "z" / "moved")  # a move within the directory
    (root / "z" / "new").write_bytes(b"new\n")
    data = (root / "y" / "f08").read_bytes()
    (root / "y" / "f08").unlink()
    (root / "y" / "f08").write_bytes(data)  # same content and size, another inode

    stats = Scanner(store, root).scan()
    assert stats.errors == []
    fresh = Store.create(tmp_path / "fresh" / "repld.db")
    Scanner(fresh, root).scan()
    assert rows(store) == rows(fresh)
    deleted = {p for (p,) in store.execute("SELECT path FROM records WHERE deleted = 1")}
    assert deleted == {"x/f04", "z/f07"} | {f"x/sub/f{i:02}" for i in range(20)}
    moved = store.history("z/moved")
    assert len(moved) == 1 and moved[0].note == "moved from z/f07"
    assert Scanner(store, root).scan().events == 0
    store.close()
    fresh.close()


def test_a_second_sync_does_not_read_back_what_the_first_wrote(tmp_path):
    """The first sync writes a's records into b, under b's sequence numbers after a's mark of
    b: the next sync read each back into a only to find it equal (as long as the first sync's
    planning). What b holds in the very version a has is marked seen; anything else is not."""
    a, b = make_replicas(tmp_path, "a", "b")
    for i in range(50):
        (a.root / f"f{i:02}").write_text(f"{i}\n")
    (b.root / "from-b.txt").write_text("b's own\n")
    a.sync(b)

    def mark() -> tuple[int, int]:
        with open_replica(a.config, write=False) as ra, open_replica(b.config, write=False) as rb:
            return ra.store.peer_mark(rb.store.replica_id).seen_seq, rb.store.seq

    seen, top = mark()
    assert seen == top, (seen, top)  # all of b's records are a's own, or taken by a already
    # A change on b after the first pass is news to a: the mark stops before it.
    (b.root / "f07").write_text("edited on b\n")
    b("scan")
    seen2, top2 = mark()
    assert top2 > seen2 == seen
    a.sync(b)
    assert (a.root / "f07").read_text() == "edited on b\n"
    assert mark()[0] == mark()[1]
