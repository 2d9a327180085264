"""The replica's SQLite database: identity, records, per-file history, sequence, peer marks.

Promises:
- WAL mode; every scan or sync batch is one transaction (``with store.transaction():``), so a
  ``kill -9`` at any point leaves the database as it was before or after a whole batch.
- Records are read in pages (by path or by sequence), never all at once: memory stays bounded.
- Every change to a record gets the next local sequence number and one history row that keeps the
  origin replica and the origin's sequence number, so ``repld log`` can tell where a change came
  from however many peers relayed it.
- One writer at a time: a process that writes holds an exclusive lock on ``repld.lock`` beside the
  database, so two syncs (or a sync and the daemon) never interleave on one replica.
- Every read sees every earlier write, also inside ``write_behind()`` (where a thread writes the
  buffered rows while the caller goes on): see ``write_behind`` for how; and after
  ``read_ahead``, whose answers stand only as long as no record changes.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..protocol.errors import ProtocolError
from ..protocol.record import Action, Kind, Record, parent_of
from ..protocol.version import VersionVector
from .errors import DamagedDatabase, StoreBusy, StoreError

if TYPE_CHECKING:
    from ..protocol.messages import Held

SCHEMA_VERSION = 1
WAL_KEPT = 4 << 20  # bytes of the -wal file kept once its content is in the database
HELD_KEPT = 256  # replicas whose holds peers told of that are kept (wire: MAX_HELD, 1024)
PAGE = 1000
PRUNED_FLOOR = "pruned_floor"  # meta key: see Store.pruned_floor
CHECKPOINTS_KEPT = 2000  # per peer, at the most (see Store._checkpoint)
# Parents of the rows an open transaction wrote that the store keeps track of, at the most (one
# path per directory written to); past it, reads no longer go around the writer thread.
MAX_TX_PARENTS = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    path TEXT PRIMARY KEY,
    parent TEXT NOT NULL,
    guid TEXT NOT NULL,
    kind TEXT NOT NULL,
    version TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    blocks BLOB NOT NULL,
    target TEXT NOT NULL,
    modified_by TEXT NOT NULL,
    origin_seq INTEGER NOT NULL,
    action TEXT NOT NULL,
    changed_ns INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    replicated_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_parent ON records(parent);
CREATE UNIQUE INDEX IF NOT EXISTS records_seq ON records(seq);
CREATE INDEX IF NOT EXISTS records_sha ON records(sha256) WHERE sha256 != '' AND deleted = 0;
CREATE INDEX IF NOT EXISTS records_ino ON records(ino) WHERE ino != 0;
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    guid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    origin TEXT NOT NULL,
    origin_seq INTEGER NOT NULL,
    action TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    via TEXT NOT NULL,
    note TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_path ON history(path);
CREATE TABLE IF NOT EXISTS peers (
    replica_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    seen_seq INTEGER NOT NULL DEFAULT 0,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    last_sync_ns INTEGER NOT NULL DEFAULT 0
);
"""

# Tables added since schema 1 was first written: made on every write open too (IF NOT EXISTS).
# checkpoints: "having applied the records of replica peer_id up to peer_seq, this replica's
# newest sequence number was my_seq" (see Store._checkpoint). held: "replica replica_id holds this
# replica's records up to upto", as peer ``via`` said in its Acks (see Store.held_for).
_ADDED = """
CREATE TABLE IF NOT EXISTS checkpoints (
    peer_id TEXT NOT NULL,
    peer_seq INTEGER NOT NULL,
    my_seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    PRIMARY KEY (peer_id, peer_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held (
    replica_id TEXT PRIMARY KEY,
    upto INTEGER NOT NULL,
    via TEXT NOT NULL,
    key TEXT NOT NULL,
    time_ns INTEGER NOT NULL
);
"""

_COLS = (
    "path, guid, kind, version, deleted, mode, mtime_ns, size, sha256, blocks, target, "
    "modified_by, origin_seq, action, changed_ns, seq, replicated_ns, ino"
)

# The last: when this replica last checked the file against its record (see Store.checked).
_STAT_COLS = ("path, kind, deleted, mode, mtime_ns, size, ino, "
              "CASE WHEN replicated_ns != 0 THEN replicated_ns ELSE changed_ns END")  # fmt: skip
StatRow = tuple[str, str, int, int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    origin: str
    origin_seq: int
    action: str
    version: VersionVector
    kind: str
    size: int
    sha256: str
    time_ns: int
    via: str
    note: str


@dataclass(frozen=True, slots=True)
class PeerMark:
    replica_id: str
    name: str
    seen_seq: int  # the highest of their sequence numbers we have applied
    acked_seq: int  # the highest of ours they have applied
    last_sync_ns: int


HASH_MATCHES = 8  # live records with one content that live_with_hash returns at most
_KINDS = {k.value: k for k in Kind}
_ACTIONS = {a.value: a for a in Action}


def _row_to_record(row: tuple[Any, ...]) -> Record:
    # Once per record read (every record of a rescan): positional, enums by dict lookup.
    (path, guid, kind, version, deleted, mode, mtime_ns, size, sha, blocks, target,
     modified_by, origin_seq, action, changed_ns, seq, replicated_ns, ino) = row  # fmt: skip
    try:
        return Record(
            str(path), str(guid), _KINDS[kind], VersionVector.decode(str(version)),
            bool(deleted), int(mode), int(mtime_ns), int(size), str(sha), bytes(blocks),
            str(target), str(modified_by), int(origin_seq), _ACTIONS[action], int(changed_ns),
            int(seq), int(replicated_ns), int(ino),
        )  # fmt: skip
    except KeyError as e:
        raise StoreError(f"damaged record for {path!r}: unknown kind or action {e}") from None
    except (ValueError, ProtocolError) as e:
        raise StoreError(f"damaged record for {path!r}: {e}") from None


_RECORDS_INSERT = (f"INSERT OR REPLACE INTO records (parent, {_COLS}) VALUES ", 19)
_HISTORY_INSERT = (
    "INSERT INTO history (path, guid, seq, origin, origin_seq, action, version, kind, size, "
    "sha256, time_ns, via, note) VALUES ",
    13,
)


@functools.lru_cache(maxsize=16)
def _values_sql(head: str, width: int, rows: int) -> str:
    one = "(" + ",".join("?" * width) + ")"
    return head + ",".join([one] * rows)


def _write_rows(
    db: sqlite3.Connection, records: list[tuple[object, ...]], history: list[tuple[object, ...]]
) -> None:
    """Insert buffered rows in their order, many rows per statement: as fast as executemany, and
    a writer thread needs the GIL once per statement instead of once per row."""
    per = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    for (head, width), rows in ((_RECORDS_INSERT, records), (_HISTORY_INSERT, history)):
        step = max(1, per // width)
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            db.execute(_values_sql(head, width, len(chunk)), tuple(itertools.chain(*chunk)))


class _Writer:
    """A thread that writes batches of rows on the store's connection, in the order given."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db
        self._jobs: queue.SimpleQueue[
            tuple[list[tuple[object, ...]], list[tuple[object, ...]]] | None
        ] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._queued = 0
        self._discard = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="repld-store-writer", daemon=True)
        self._thread.start()

    def submit(self, records: list[tuple[object, ...]], history: list[tuple[object, ...]]) -> None:
        if self.error is not None:
            raise self.error  # the transaction is lost; say so now, not at the commit
        with self._idle:
            self._queued += 1
        self._jobs.put((records, history))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self.error is None and not self._discard:  # after a failure, it rolls back
                try:
                    _write_rows(self._db, *job)
                except BaseException as e:
                    self.error = e
            with self._idle:
                self._queued -= 1
                if not self._queued:
                    self._idle.notify_all()

    def drain(self) -> None:
        """Wait until every batch submitted is written; raise what writing one raised."""
        with self._idle:
            while self._queued:
                self._idle.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the thread once it is done with the batch it is writing. Batches still queued
        are dropped: stop comes after a drain, or when the transaction is rolled back."""
        self._discard = True
        self._jobs.put(None)
        self._thread.join()


class _ReadAhead:
    """What ``Store.read_ahead`` read, and at which generation of the store."""

    __slots__ = ("paths", "hashes", "records", "present", "generation", "refreshed")

    def __init__(self, paths: list[str], hashes: set[str]):
        self.paths = paths
        self.hashes = hashes
        self.records: dict[str, Record | None] = {}
        self.present: set[str] = set()
        self.generation = -1
        self.refreshed = False


def _prefix_bounds(prefix: str) -> tuple[str, str]:
    """Paths strictly below ``prefix`` sort in [prefix + '/', prefix + '0')."""
    return prefix + "/", prefix + "0"


def _out_of_room(e: sqlite3.OperationalError) -> bool:
    text = str(e)
    return "full" in text or "disk I/O error" in text


# Free space the file system of the database must have for it to be opened (see _room_to_open).
OPEN_ROOM = 256 << 10
SHM_PAGE = 32 << 10


def _room_to_open(db_path: Path) -> None:
    """Refuse to open a database whose file system is all but full, with a message.

    SQLite maps the WAL index (the -shm file beside the database) into memory, and makes its
    pages by writing their last byte: on a full disk the rest of a page is a hole, and the first
    touch of it kills the process with SIGBUS ("Bus error") rather than fail, at every command
    until room is made. An index whose first page has all its blocks is safe to open."""
    try:
        vfs = os.statvfs(db_path.parent)
    except OSError:
        return
    blocks = vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail
    free = blocks * vfs.f_frsize
    if free >= OPEN_ROOM:
        return
    try:
        st = os.stat(f"{db_path}-shm")
        if st.st_size >= SHM_PAGE and st.st_blocks * 512 >= st.st_size:
            return
    except OSError:
        pass
    raise StoreError(
        f"{db_path}: the file system of {db_path.parent} is full ({free >> 10} KiB free): "
        "SQLite needs some room to open the database. Make room there (repld's own versions "
        "of deleted files are kept in its versions folder, see `repld versions`) and run again; "
        "nothing was changed"
    )


class Store:
    def __init__(self, db_path: Path, *, write: bool = True, clock: object = time.time_ns):
        self.db_path = db_path
        self._clock = clock
        self._lock_fd: int | None = None
        if not db_path.exists():
            raise StoreError(f"{db_path}: no database; run `repld init ROOT` first")
        _room_to_open(db_path)
        if write:
            self._lock()
        if db_path.stat().st_size == 0 and not db_path.with_name(db_path.name + "-wal").exists():
            # (Opened, SQLite would make it a new empty database: the loss would not show.)
            self._unlock()
            raise DamagedDatabase(db_path, "it is empty: 0 bytes")
        try:
            self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            # The -wal file grows to the biggest transaction (a first sync of 100k files) and,
            # left alone, keeps that size as long as the daemon runs: cut back once checkpointed.
            self._db.execute(f"PRAGMA journal_size_limit={WAL_KEPT}")
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError as e:
            if str(e).startswith("no such table"):
                self._unlock()
                raise DamagedDatabase(db_path, f"{e}: not a repld database") from None
            # Not a damaged file: SQLite could not read or write it (a read-only or full
            # file system, no permission for its -wal and -shm files beside it).
            self._unlock()
            raise StoreError(
                f"{db_path}: cannot open the database ({e}); its directory must be writable, "
                "and its file system not full"
            ) from None
        except sqlite3.DatabaseError as e:
            self._unlock()
            raise DamagedDatabase(db_path, str(e)) from None
        if int(meta.get("schema", 0)) != SCHEMA_VERSION:
            self.close()
            raise StoreError(f"{db_path}: schema {meta.get('schema')} not supported")
        self.tree_id: str = meta["tree_id"]
        self.replica_id: str = meta["replica_id"]
        self._seq = int(meta["seq"])
        self._committed = self._seq
        self._in_tx = False
        self._pending_records: list[tuple[object, ...]] = []
        self._pending_history: list[tuple[object, ...]] = []
        self._writer: _Writer | None = None  # inside write_behind()
        self._reader: sqlite3.Connection | None = None  # reads the last commit, in write_behind
        # The parents of the rows the open transaction wrote (None: not known).
        self._tx_parents: set[str] | None = set()
        # Changes whenever a record may have (a write, a rollback): what was read at one
        # generation is still what the database holds at the same one (see read_ahead).
        self._generation = 0
        self._ahead: _ReadAhead | None = None
        if write:
            try:
                self._db.executescript(_ADDED)  # (a database made by an older version)
            except sqlite3.Error as e:
                self.close()
                raise StoreError(f"{db_path}: cannot add this version's tables ({e})") from None

    # -- life cycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, db_path: Path, *, tree_id: str | None = None) -> Store:
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if db_path.exists():
            raise StoreError(f"{db_path}: a database is already there; refusing to overwrite it")
        tree = str(uuid.UUID(tree_id)) if tree_id else str(uuid.uuid4())
        db = sqlite3.connect(db_path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA + _ADDED)
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("schema", str(SCHEMA_VERSION)),
                    ("tree_id", tree),
                    ("replica_id", str(uuid.uuid4())),
                    ("seq", "0"),
                    ("created_ns", str(time.time_ns())),
                ],
            )
        finally:
            db.close()
        os.chmod(db_path, 0o600)
        return cls(db_path)

    def _lock(self) -> None:
        lock_path = self.db_path.with_suffix(".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(
                f"{lock_path}: cannot open the lock file ({e.strerror}): the state directory "
                f"{lock_path.parent} must be writable by this user"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusy(
                f"{self.db_path}: in use by another repld process (the daemon, a sync or a "
                "scan): stop the daemon first (`systemctl --user stop repld`, or Ctrl-C where "
                "`repld run` runs), or wait for the sync or scan to finish"
            ) from None
        self._lock_fd = fd

    @staticmethod
    def held_elsewhere(db_path: Path) -> bool:
        """Whether a process holds the write lock of the database (see _lock): a daemon,
        perhaps starting; or a sync or a scan."""
        try:
            fd = os.open(db_path.with_suffix(".lock"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # (and the lock taken with it)
        return False

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        self._stop_writer()
        try:
            self._db.close()
        except Exception:
            pass
        self._unlock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and sequence numbers ------------------------------------------------------

    @contextmanager
    def transaction(self, *, commit: bool = True) -> Iterator[None]:
        """One atomic group of changes. ``commit=False`` rolls everything back at the end (a dry
        run); transactions opened inside it join it."""
        if self._in_tx:
            yield
            return
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        self._tx_parents = set()
        seq_before = self._seq
        try:
            yield
            db = self._conn()
            if commit:
                db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(self._seq),))
                db.execute("COMMIT")
                self._committed = self._seq
            else:
                db.execute("ROLLBACK")
                self._seq = seq_before
                self._generation += 1
        except BaseException as e:
            self._pending_records, self._pending_history = [], []
            self._stop_writer()
            if self._db.in_transaction:  # (SQLite rolls back by itself after a full disk)
                self._db.execute("ROLLBACK")
            self._seq = seq_before
            self._generation += 1
            if isinstance(e, sqlite3.OperationalError) and _out_of_room(e):
                raise StoreError(
                    f"{self.db_path}: {e}: nothing of this was recorded. Make room on the file "
                    f"system of {self.db_path.parent} and run again: files already written "
                    "are found there and recorded then"
                ) from None
            raise
        finally:
            self._in_tx = False
            self._tx_parents = set()

    @contextmanager
    def write_behind(self) -> Iterator[None]:
        """Inside a transaction: buffered rows are written by a thread while the caller goes on
        (SQLite releases the GIL while it works), for a long series of puts (a whole scan).

        Every read still sees every earlier write. A read through the store (``execute``,
        ``get``, ``db``, ...) first waits until the thread has written every row handed to it
        (and writes the rows still buffered), then reads on the one connection. ``children``
        alone may read without waiting: when no row this transaction wrote has that parent, the
        rows it asks for are those of the last commit (this process holds the write lock since
        BEGIN IMMEDIATE, and a record's parent is a function of its path, so neither a new row
        nor a row it replaces can be one of them); a second connection reads them while the
        thread writes. Raw SQL through ``execute`` other than a SELECT, and any use of ``db``,
        might write anything: after one, every read waits.

        Commit waits for the thread too, and a failed write fails the transaction (raised at
        the next put, read or commit), which rolls back: a kill at any point leaves the
        database as it was before the transaction or after it, as without the thread."""
        if not self._in_tx or self._writer is not None:
            yield
            return
        self.flush()
        self._writer = _Writer(self._db)
        try:
            yield
            self._conn()  # the last rows, and a failed write raised here, inside the transaction
        finally:
            self._stop_writer()

    def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _conn(self) -> sqlite3.Connection:
        """The connection, once every earlier write is in it (none waits in a buffer or in the
        writer thread, which is idle until the next flush)."""
        self.flush()
        if self._writer is not None:
            self._writer.drain()
        return self._db

    @property
    def db(self) -> sqlite3.Connection:
        """The connection for raw SQL, once every earlier write is in it. SQL through it may
        write anything, so for the rest of the transaction every read waits for the writer."""
        self._tx_parents = None
        self._generation += 1
        return self._conn()

    @property
    def writable(self) -> bool:
        """Opened to write (this process holds the write lock)."""
        return self._lock_fd is not None

    @property
    def committed_seq(self) -> int:
        """The sequence number as the database on disk knows it (outside any open transaction)."""
        return self._committed

    @property
    def seq(self) -> int:
        return self._seq

    def _next_seq(self) -> int:
        assert self._in_tx, "records change only inside a transaction"
        self._seq += 1
        return self._seq

    # -- records --------------------------------------------------------------------------------

    def get(self, path: str) -> Record | None:
        ahead = self._ahead
        if ahead is not None and path in ahead.records and self._ahead_fresh(ahead):
            return ahead.records[path]
        row = self.execute(f"SELECT {_COLS} FROM records WHERE path = ?", (path,)).fetchone()
        return _row_to_record(row) if row else None

    def get_many(self, paths: list[str]) -> dict[str, Record]:
        """The records of those of ``paths`` that have one, in one query per 500 (what the
        read-ahead of ``read_ahead`` holds is left as it is)."""
        found: dict[str, Record] = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            rows = self.execute(
                f"SELECT {_COLS} FROM records WHERE path IN ({','.join('?' * len(chunk))})",
                tuple(chunk),
            )
            for row in rows:
                found[row[0]] = _row_to_record(row)
        return found

    def read_ahead(self, paths: Iterable[str], hashes: Iterable[str] = ()) -> None:
        """Read the records of ``paths``, and which of ``hashes`` a live record has, in a few
        queries, for the ``get`` and ``live_with_hash`` calls that are to come (a sync planning a
        page of incoming records: one query instead of one per path and per file).

        They answer from what was read only while no record has changed since. After a change
        what was read is read again, once; after a second change they ask the database again,
        one call at a time, until the next ``read_ahead``. Only the last read is kept. A store
        opened without the write lock reads nothing ahead: another process may be writing.
        """
        if self._lock_fd is None:
            return
        ahead = _ReadAhead(list(paths), {h for h in hashes if h})
        self._fill_ahead(ahead)
        self._ahead = ahead

    def _fill_ahead(self, ahead: _ReadAhead) -> None:
        self._ahead = None  # reads the database
        records: dict[str, Record | None] = dict.fromkeys(ahead.paths)
        records.update(self.get_many(ahead.paths))
        ahead.records = records
        ahead.present = self.hashes_present(ahead.hashes)
        ahead.generation = self._generation

    def _ahead_fresh(self, ahead: _ReadAhead) -> bool:
        """Whether what read_ahead read is what the database holds (read again, once, if not)."""
        if ahead.generation == self._generation:
            return True
        if ahead.refreshed:
            self._ahead = None
            return False
        ahead.refreshed = True
        self._fill_ahead(ahead)
        self._ahead = ahead
        return True

    def children(self, parent: str) -> list[Record]:
        return [_row_to_record(r) for r in self._children_rows(_COLS, parent)]

    def children_stat(self, parent: str) -> list[StatRow]:
        """``(path, kind, deleted, mode, mtime_ns, size, ino, checked)`` of each child (see
        checked_at): what a rescan
        compares with the disk, read without building a record for each (an unchanged file
        needs no more)."""
        return self._children_rows(_STAT_COLS, parent)

    def _children_rows(self, cols: str, parent: str) -> list[Any]:
        sql = f"SELECT {cols} FROM records WHERE parent = ?"
        parents = self._tx_parents
        if self._writer is not None and parents is not None and parent not in parents:
            # No row of this transaction has this parent: the last commit has all the rows this
            # asks for, and a second connection reads them without waiting for the writer (see
            # write_behind). Its own reads, each a transaction, see the last commit.
            if self._reader is None:
                self._reader = sqlite3.connect(self.db_path, isolation_level=None,
                                               check_same_thread=False)  # fmt: skip
                self._reader.execute("PRAGMA query_only=1")
                self._reader.execute("PRAGMA busy_timeout=10000")
            return self._reader.execute(sql, (parent,)).fetchall()
        return self.execute(sql, (parent,)).fetchall()

    def iter_paths(self, prefix: str = "", *, include_prefix: bool = True) -> Iterator[Record]:
        """Records in path order, the whole tree or one subtree, read a page at a time."""
        if prefix:
            lo, hi = _prefix_bounds(prefix)
            if include_prefix:
                top = self.get(prefix)
                if top is not None:
                    yield top
        else:
            lo, hi = "", "\U0010ffff"
        last = lo
        first = True
        while True:
            op = ">=" if first else ">"
            rows = self.execute(
                f"SELECT {_COLS} FROM records WHERE path {op} ? AND path < ? "
                "ORDER BY path LIMIT ?",
                (last, hi, PAGE),
            ).fetchall()
            first = False
            if not rows:
                return
            for r in rows:
                yield _row_to_record(r)
            last = str(rows[-1][0])

    def records_since(self, seq: int) -> Iterator[Record]:
        """Records changed after local sequence ``seq``, in sequence order, a page at a time."""
        while True:
            rows = self.execute(
                f"SELECT {_COLS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (seq, PAGE)
            ).fetchall()
            if not rows:
                return
            for r in rows:
                yield _row_to_record(r)
            seq = int(rows[-1][15])

    def page_since(self, seq: int, limit: int) -> list[Record]:
        """At most ``limit`` records changed after ``seq``, in sequence order."""
        rows = self.execute(
            f"SELECT {_COLS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [_row_to_record(r) for r in rows]

    def count_since(self, seq: int) -> tuple[int, int]:
        """(records, bytes of live files) changed after ``seq``: what a peer at ``seq`` lacks."""
        row = self.execute(
            # (TOTAL, a float, never overflows as SUM can: a peer's record may claim any size.)
            "SELECT COUNT(*), TOTAL(CASE WHEN deleted = 0 THEN size ELSE 0 END) FROM records "
            "WHERE seq > ?",
            (seq,),
        ).fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def changes_between(self, after: int, upto: int, *, not_by: str) -> int:
        """How many records with a sequence in (after, upto] hold a change that replica
        ``not_by`` did not make itself: what a peer at ``after`` got from us up to ``upto``."""
        row = self.execute(
            "SELECT COUNT(*) FROM records WHERE seq > ? AND seq <= ? AND modified_by != ?",
            (after, upto, not_by),
        ).fetchone()
        return int(row[0] or 0)

    def count_git_objects(self) -> int:
        """Live paths in a git repository's object store (see scanner.is_git_object): a scan of
        the whole table, for the mass-delete circuit breaker only."""
        (n,) = self.execute(
            "SELECT COUNT(*) FROM records WHERE deleted = 0 AND "
            "(path LIKE '.git/objects/%' OR path LIKE '%/.git/objects/%')"
        ).fetchone()
        return int(n)

    def hashes_present(self, hashes: set[str]) -> set[str]:
        """Which of ``hashes`` some live record here has (one query per 500 hashes)."""
        found: set[str] = set()
        todo = sorted(hashes)
        for i in range(0, len(todo), 500):
            chunk = todo[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.execute(
                # The condition repeats the partial index's, or SQLite would scan the whole table.
                f"SELECT DISTINCT sha256 FROM records WHERE sha256 IN ({marks}) AND sha256 != '' "
                "AND deleted = 0",
                tuple(chunk),
            )
            found.update(r[0] for r in rows)
        return found

    def live_with_hash(self, sha256: str, guid: str = "") -> list[Record]:
        """Up to HASH_MATCHES live records with this content (and this ``guid``, if given)."""
        ahead = self._ahead
        if ahead is not None and sha256 in ahead.hashes and self._ahead_fresh(ahead):
            if sha256 not in ahead.present:
                return []
        rows = self.execute(
            # The condition repeats the partial index's, or SQLite would scan the whole table.
            f"SELECT {_COLS} FROM records WHERE sha256 = ? AND sha256 != '' AND deleted = 0 "
            f"{'AND guid = ? ' if guid else ''}LIMIT {HASH_MATCHES}",
            (sha256, guid) if guid else (sha256,),
        )
        return [_row_to_record(r) for r in rows]

    def put(
        self,
        record: Record,
        *,
        local: bool,
        via: str = "",
        note: str = "",
        ino: int | None = None,
        written: bool = False,
    ) -> None:
        """Store ``record`` with the next local sequence number and one history row.

        ``local`` is True for an event this replica made (scan, resolve): it becomes the origin.
        Otherwise the record came from a peer (``via`` names it) and keeps its origin. ``ino``,
        when given, is stored instead of the record's (the inode of the file just written).
        """
        seq = self._next_seq()
        now = self._clock()  # type: ignore[operator]
        # As a record: record.with_(seq=seq, ...) for each case, without building one.
        modified_by, origin_seq = record.modified_by, record.origin_seq
        # ``written``: the file was just written here, its ctime this replica's own doing: the
        # whole of now counts as checked (see checked_at), and no scan reads it again.
        changed_ns, replicated_ns = record.changed_ns, now + (CTIME_SLACK_NS if written else 0)
        if local or not modified_by:
            modified_by, origin_seq, changed_ns, replicated_ns = self.replica_id, seq, now, 0
        elif modified_by == self.replica_id and origin_seq == 0:
            origin_seq = seq
        self._append(
            record.path, record.guid, record.kind.value, record.version.encode(),
            record.deleted, record.mode, record.mtime_ns, record.size, record.sha256,
            record.blocks, record.target, modified_by, origin_seq, record.action.value,
            changed_ns, seq, replicated_ns, record.ino if ino is None else ino, via, note,
        )  # fmt: skip

    def put_local(
        self,
        path: str,
        guid: str,
        kind: str,
        version: str,
        action: str,
        mode: int,
        mtime_ns: int,
        size: int,
        sha256: str,
        blocks: bytes,
        ino: int,
        note: str = "",
    ) -> int:
        """``put(Record(path, guid, Kind(kind), VersionVector.decode(version), mode=mode, ...,
        action=Action(action), ino=ino), local=True, note=note)`` without building a Record:
        the scanner's path for a new or changed file (once per file of a first
        scan). Kind, version and action come in their stored text forms. Returns the seq."""
        seq = self._next_seq()
        me = self.replica_id
        self._append(path, guid, kind, version, False, mode, mtime_ns, size, sha256, blocks, "",
                     me, seq, action, self._clock(), seq, 0, ino, "", note)  # type: ignore[operator]  # fmt: skip
        return seq

    def _append(
        self, path: str, guid: str, kind: str, version: str, deleted: bool, mode: int,
        mtime_ns: int, size: int, sha256: str, blocks: bytes, target: str, modified_by: str,
        origin_seq: int, action: str, changed_ns: int, seq: int, replicated_ns: int, ino: int,
        via: str, note: str,
    ) -> None:  # fmt: skip
        """Buffer one record row and its history row (written by flush, in order)."""
        self._generation += 1
        parent = parent_of(path)
        if (parents := self._tx_parents) is not None:
            parents.add(parent)
            if len(parents) > MAX_TX_PARENTS:
                self._tx_parents = None
        self._pending_records.append(
            (parent, path, guid, kind, version, int(deleted), mode, mtime_ns,
             size, sha256, blocks, target, modified_by, origin_seq, action, changed_ns, seq,
             replicated_ns, ino)  # fmt: skip
        )
        self._pending_history.append(
            (path, guid, seq, modified_by, origin_seq, action, version, kind, size, sha256,
             changed_ns, via, note)  # fmt: skip
        )
        if len(self._pending_records) >= PAGE:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows (puts are batched: one statement for many rows is much cheaper
        than one a row), or hand them to the writer thread in ``write_behind``. Every read and
        every commit flushes first and waits for the writer, so readers never miss a write."""
        if not self._pending_records:
            return
        records, self._pending_records = self._pending_records, []
        history, self._pending_history = self._pending_history, []
        if self._writer is not None:
            self._writer.submit(records, history)
        else:
            _write_rows(self._db, records, history)

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """A raw query that sees every write so far."""
        if sql.lstrip()[:6].upper() != "SELECT":
            self._tx_parents = None  # it may write anything: reads wait for the writer from now
            self._generation += 1
        return self._conn().execute(sql, params)

    def file_inodes(self) -> set[int]:
        """The inode numbers the records of files remember (the stat cache's, for move checks)."""
        return {ino for (ino,) in self.execute("SELECT ino FROM records WHERE ino != 0")}

    def resend(self, path: str) -> bool:
        """Give ``path``'s record the next sequence number, unchanged otherwise (not an event:
        no history row): the streams to every replica carry it again."""
        seq = self._next_seq()
        return self.execute("UPDATE records SET seq = ? WHERE path = ?", (seq, path)).rowcount > 0

    def set_ino(self, path: str, ino: int, ctime_ns: int = 0) -> None:
        """Refresh the local stat cache (not an event: no sequence number, nothing replicated):
        the file's inode, and when it was found to match its record (see checked_at: now, or
        its ctime if that is later, a clock set back since it was written)."""
        if (parents := self._tx_parents) is not None:
            parents.add(parent_of(path))
        self._generation += 1
        now: int = self._clock()  # type: ignore[operator]
        self._conn().execute("UPDATE records SET ino = ?, replicated_ns = ? WHERE path = ?",
                             (ino, max(now, ctime_ns + CTIME_SLACK_NS), path))  # fmt: skip

    def history(self, path: str) -> list[Event]:
        rows = self.execute(
            "SELECT seq, origin, origin_seq, action, version, kind, size, sha256, time_ns, via, "
            "note FROM history WHERE path = ? ORDER BY seq",
            (path,),
        )
        return [
            Event(r[0], r[1], r[2], r[3], VersionVector.decode(r[4]), r[5], r[6], r[7], r[8],
                  r[9], r[10])  # fmt: skip
            for r in rows
        ]

    def counts(self) -> tuple[int, int, int]:
        """(files, dirs, bytes) of the live tree."""
        row = self.execute(
            "SELECT SUM(kind != 'dir'), SUM(kind = 'dir'), TOTAL(size) FROM records "
            "WHERE deleted = 0"
        ).fetchone()
        return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)

    # -- peers ----------------------------------------------------------------------------------

    def peer_mark(self, replica_id: str) -> PeerMark:
        row = self._conn().execute(
            "SELECT replica_id, name, seen_seq, acked_seq, last_sync_ns FROM peers "
            "WHERE replica_id = ?",
            (replica_id,),
        ).fetchone()
        return PeerMark(*row) if row else PeerMark(replica_id, "", 0, 0, 0)

    def peer_marks(self) -> list[PeerMark]:
        rows = self._conn().execute(
            "SELECT replica_id, name, seen_seq, acked_seq, last_sync_ns FROM peers ORDER BY name"
        )
        return [PeerMark(*r) for r in rows]

    def meta(self, key: str) -> str | None:
        """A value of the meta table (tree id, replica id, and notes such as ``fs_checked``)."""
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def pruned_floor(self) -> int:
        """The highest count of this replica's own events in the version of a tombstone prune
        dropped: its next first event on a path counts from there (see Scanner.scan)."""
        return int(self.meta(PRUNED_FLOOR) or 0)

    def set_meta(self, key: str, value: str) -> None:
        """Set a note in the meta table, in its own transaction (or the caller's)."""
        with self.transaction():
            self._conn().execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def forget_seen(self) -> int:
        """Forget how far we have seen every peer's records (the next exchange with each starts
        from its first record); how many peers that was."""
        with self.transaction():
            return self._conn().execute("UPDATE peers SET seen_seq = 0 WHERE seen_seq != 0").rowcount

    def same_records_upto(self, other_db: Path, after: int, top: int) -> int:
        """How far (a sequence number of the replica whose database is ``other_db``, from
        ``after`` to ``top``) every record of that replica's holds the same version as this
        replica's record of its path: those are no news here. One query, both databases."""
        if top <= after:
            return after
        conn = self._conn()
        conn.execute("ATTACH DATABASE ? AS other", (str(other_db),))
        try:
            (first_new,) = conn.execute(
                "SELECT MIN(o.seq) FROM other.records o LEFT JOIN main.records m "
                "ON m.path = o.path WHERE o.seq > ? AND o.seq <= ? AND (m.path IS NULL "
                "OR m.version != o.version OR m.deleted != o.deleted)",
                (after, top),
            ).fetchone()
        finally:
            conn.execute("DETACH DATABASE other")
        return top if first_new is None else max(after, int(first_new) - 1)

    def set_peer_mark(
        self,
        replica_id: str,
        *,
        name: str | None = None,
        seen_seq: int | None = None,
        acked_seq: int | None = None,
    ) -> None:
        old = self.peer_mark(replica_id)
        self._conn().execute(
            "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?)",
            (
                replica_id,
                name if name is not None else old.name,
                seen_seq if seen_seq is not None else old.seen_seq,
                acked_seq if acked_seq is not None else old.acked_seq,
                self._clock(),  # type: ignore[operator]
            ),
        )
        if seen_seq is not None and seen_seq > old.seen_seq:
            self._checkpoint(replica_id, seen_seq)

    def _checkpoint(self, peer_id: str, peer_seq: int) -> None:
        """This replica has applied ``peer_id``'s records up to ``peer_seq``: note where its own
        sequence stands (see Store.held_for). Rows pile up, one per page applied; past
        CHECKPOINTS_KEPT for a peer, every other one of the older half goes (an older point
        gives a smaller answer, never a wrong one), and prune drops those no answer needs."""
        conn = self._conn()
        conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                     (peer_id, peer_seq, self._seq, self._clock()))  # type: ignore[operator]  # fmt: skip
        (n,) = conn.execute("SELECT COUNT(*) FROM checkpoints WHERE peer_id = ?",
                            (peer_id,)).fetchone()  # fmt: skip
        if n > CHECKPOINTS_KEPT:
            old = [s for (s,) in conn.execute(
                "SELECT peer_seq FROM checkpoints WHERE peer_id = ? ORDER BY peer_seq LIMIT ?",
                (peer_id, n // 2))]  # fmt: skip
            conn.executemany("DELETE FROM checkpoints WHERE peer_id = ? AND peer_seq = ?",
                             [(peer_id, s) for s in old[1::2]])  # fmt: skip

    def held(self) -> dict[str, tuple[int, str, str]]:
        """What peers said in their Acks: replica id -> (how far it holds this replica's
        records, the id of the peer that said so, its public key if that peer knew it)."""
        try:
            rows = self._conn().execute("SELECT replica_id, upto, via, key FROM held").fetchall()
        except sqlite3.OperationalError:
            return {}  # (a database of an older version, opened read-only: none said yet)
        return {str(r): (int(u), str(v), str(k)) for r, u, v, k in rows}

    def note_held(self, via: str, held: Iterable[Held]) -> None:
        """Peer ``via`` says how far other replicas hold this replica's records (its Ack)."""
        now = self._clock()
        known = {str(r) for (r,) in self._conn().execute("SELECT replica_id FROM held")}
        for h in held:
            if h.replica_id in (self.replica_id, via):
                continue  # (what a peer holds of ours it says itself, in the Ack's upto)
            if h.replica_id not in known:
                if len(known) >= HELD_KEPT:
                    continue  # (a hostile peer's made-up replicas by the thousand: not kept)
                known.add(h.replica_id)
            self._conn().execute(
                "INSERT INTO held VALUES (?, ?, ?, ?, ?) ON CONFLICT (replica_id) DO UPDATE SET "
                "upto = excluded.upto, via = excluded.via, time_ns = excluded.time_ns, "
                "key = CASE WHEN excluded.key != '' THEN excluded.key ELSE held.key END "
                "WHERE excluded.upto > held.upto",
                (h.replica_id, min(h.upto, self._seq), via, h.key, now),
            )

    def known_holds(self, held: dict[str, tuple[int, str, str]] | None = None) -> dict[str, int]:
        """How far each other replica this one knows of holds its records: acknowledged by
        it, or said by a peer (``held``: what self.held() gives, if read already)."""
        known = {str(r): int(a) for r, a in
                 self._conn().execute("SELECT replica_id, acked_seq FROM peers")}  # fmt: skip
        for rid, (upto, _via, _key) in (self.held() if held is None else held).items():
            known[rid] = max(known.get(rid, 0), upto)
        known.pop(self.replica_id, None)
        return known

    def held_for(self, peer_id: str, keys: dict[str, str] | None = None) -> tuple[Held, ...]:
        """How far the other replicas this one knows of hold the records of peer ``peer_id``,
        for the Acks to it: one that holds this replica's records up to P holds the peer's up
        to the last point this replica had applied of them when its own sequence was at P
        (that point's records were here then, or something newer on their paths, and all of
        it went to that replica). ``keys``: public keys of replica ids, said along."""
        from ..protocol.messages import Held  # (the wire's module: not needed by the tools)

        keys = dict(keys or {})
        held = self.held()
        for rid, (_upto, _via, key) in held.items():
            if key:
                keys.setdefault(rid, key)
        out: list[Held] = []
        for rid, mine in self.known_holds(held).items():
            if rid == peer_id or mine <= 0:
                continue
            try:
                (theirs,) = self._conn().execute(
                    "SELECT MAX(peer_seq) FROM checkpoints WHERE peer_id = ? AND my_seq <= ?",
                    (peer_id, mine),
                ).fetchone()
            except sqlite3.OperationalError:
                return ()
            if theirs:
                out.append(Held(rid, int(theirs), keys.get(rid, "")))
        # (At most what a peer takes in one Ack: the held table is bounded as much, but older
        # databases may hold more.)
        return tuple(sorted(out, key=lambda h: h.replica_id))[:HELD_KEPT]

    def trim_checkpoints(self) -> int:
        """Drop the checkpoints no answer of held_for can use any more: older than the newest
        one at or below how far every known replica holds this one's records."""
        floor = min(self.known_holds().values(), default=self._seq)
        return self._conn().execute(
            "DELETE FROM checkpoints WHERE my_seq < (SELECT MAX(c.my_seq) FROM checkpoints AS c "
            "WHERE c.peer_id = checkpoints.peer_id AND c.my_seq <= ?)", (floor,)
        ).rowcount


CLOCK_REALTIME_COARSE = 5  # <linux/time.h>; Python's time module does not name it


def _ctime_slack() -> int:
    try:
        tick = int(time.clock_getres(CLOCK_REALTIME_COARSE) * 1e9)
    except OSError:
        tick = 10_000_000
    return 2 * max(tick, 1_000_000)


# A file's ctime comes from the kernel's coarse clock, a tick behind the one records are stamped
# with: a change made just after a stamp can carry a ctime just before it. So a ctime within
# this much before the stamp counts as after it (the price: a file changed in the last few
# milliseconds before it was recorded is read once more).
CTIME_SLACK_NS = _ctime_slack()


def checked_at(rec: Record) -> int:
    """When this replica last found the file on disk to be what ``rec`` says (wrote it, scanned
    it, or found it unchanged after a closer look), less CTIME_SLACK_NS: a file whose status
    changed after that (its ctime, which no program can set back) may have been written to
    since, even with its size and mtime as they were (`cp -p`, a tool that keeps the mtime):
    it is read again before it is taken as unchanged or replaced."""
    return (rec.replicated_ns or rec.changed_ns) - CTIME_SLACK_NS
