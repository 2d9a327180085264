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
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol.errors import ProtocolError
from ..protocol.record import Action, Kind, Record, parent_of
from ..protocol.version import VersionVector
from .errors import StoreError

SCHEMA_VERSION = 1
PAGE = 1000

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

_COLS = (
    "path, guid, kind, version, deleted, mode, mtime_ns, size, sha256, blocks, target, "
    "modified_by, origin_seq, action, changed_ns, seq, replicated_ns, ino"
)


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


def _prefix_bounds(prefix: str) -> tuple[str, str]:
    """Paths strictly below ``prefix`` sort in [prefix + '/', prefix + '0')."""
    return prefix + "/", prefix + "0"


class Store:
    def __init__(self, db_path: Path, *, write: bool = True, clock: object = time.time_ns):
        self.db_path = db_path
        self._clock = clock
        self._lock_fd: int | None = None
        if not db_path.exists():
            raise StoreError(f"{db_path}: no database; run `repld init ROOT` first")
        if write:
            self._lock()
        try:
            self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=10000")
            meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            self._unlock()
            raise StoreError(f"{db_path}: not a repld database ({e})") from None
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
            db.executescript(_SCHEMA)
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
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{self.db_path}: in use by another repld process (a sync, a scan or the "
                "daemon); wait for it to finish or stop it"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        try:
            self.db.close()
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
        self.db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        seq_before = self._seq
        try:
            yield
            self.flush()
            if commit:
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(self._seq),))
                self.db.execute("COMMIT")
                self._committed = self._seq
            else:
                self.db.execute("ROLLBACK")
                self._seq = seq_before
        except BaseException:
            self._pending_records, self._pending_history = [], []
            self.db.execute("ROLLBACK")
            self._seq = seq_before
            raise
        finally:
            self._in_tx = False

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
        row = self.execute(f"SELECT {_COLS} FROM records WHERE path = ?", (path,)).fetchone()
        return _row_to_record(row) if row else None

    def children(self, parent: str) -> list[Record]:
        rows = self.execute(f"SELECT {_COLS} FROM records WHERE parent = ?", (parent,))
        return [_row_to_record(r) for r in rows]

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
            "SELECT COUNT(*), SUM(CASE WHEN deleted = 0 THEN size ELSE 0 END) FROM records "
            "WHERE seq > ?",
            (seq,),
        ).fetchone()
        return int(row[0] or 0), int(row[1] or 0)

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

    def live_with_hash(self, sha256: str) -> list[Record]:
        rows = self.execute(
            # The condition repeats the partial index's, or SQLite would scan the whole table.
            f"SELECT {_COLS} FROM records WHERE sha256 = ? AND sha256 != '' AND deleted = 0 "
            "LIMIT 8",
            (sha256,),
        )
        return [_row_to_record(r) for r in rows]

    def put(
        self,
        record: Record,
        *,
        local: bool,
        via: str = "",
        note: str = "",
    ) -> Record:
        """Store ``record`` with the next local sequence number and one history row.

        ``local`` is True for an event this replica made (scan, resolve): it becomes the origin.
        Otherwise the record came from a peer (``via`` names it) and keeps its origin.
        """
        seq = self._next_seq()
        now = self._clock()  # type: ignore[operator]
        if local or not record.modified_by:
            record = record.with_(modified_by=self.replica_id, origin_seq=seq, changed_ns=now,
                                  seq=seq, replicated_ns=0)  # fmt: skip
        elif record.modified_by == self.replica_id and record.origin_seq == 0:
            record = record.with_(origin_seq=seq, seq=seq, replicated_ns=now)
        else:
            record = record.with_(seq=seq, replicated_ns=now)
        self._append(
            record.path, record.guid, record.kind.value, record.version.encode(),
            record.deleted, record.mode, record.mtime_ns, record.size, record.sha256,
            record.blocks, record.target, record.modified_by, record.origin_seq,
            record.action.value, record.changed_ns, seq, record.replicated_ns, record.ino,
            via, note,
        )  # fmt: skip
        return record

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
        self._pending_records.append(
            (parent_of(path), path, guid, kind, version, int(deleted), mode, mtime_ns,
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
        """Write buffered rows (puts are batched: one executemany is much cheaper than many
        executes). Every read and every commit flushes first, so readers never miss a write."""
        if self._pending_records:
            rows, self._pending_records = self._pending_records, []
            self.db.executemany(
                f"INSERT OR REPLACE INTO records (parent, {_COLS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        if self._pending_history:
            rows, self._pending_history = self._pending_history, []
            self.db.executemany(
                "INSERT INTO history (path, guid, seq, origin, origin_seq, action, version, kind, "
                "size, sha256, time_ns, via, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """A raw query that sees every write so far."""
        self.flush()
        return self.db.execute(sql, params)

    def file_inodes(self) -> set[int]:
        """The inode numbers the records of files remember (the stat cache's, for move checks)."""
        return {ino for (ino,) in self.execute("SELECT ino FROM records WHERE ino != 0")}

    def set_ino(self, path: str, ino: int) -> None:
        """Refresh the local stat cache (not an event: no sequence number, nothing replicated)."""
        self.flush()
        self.db.execute("UPDATE records SET ino = ? WHERE path = ?", (ino, path))

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
            "SELECT SUM(kind != 'dir'), SUM(kind = 'dir'), SUM(size) FROM records WHERE deleted = 0"
        ).fetchone()
        return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)

    # -- peers ----------------------------------------------------------------------------------

    def peer_mark(self, replica_id: str) -> PeerMark:
        row = self.db.execute(
            "SELECT replica_id, name, seen_seq, acked_seq, last_sync_ns FROM peers "
            "WHERE replica_id = ?",
            (replica_id,),
        ).fetchone()
        return PeerMark(*row) if row else PeerMark(replica_id, "", 0, 0, 0)

    def peer_marks(self) -> list[PeerMark]:
        rows = self.db.execute(
            "SELECT replica_id, name, seen_seq, acked_seq, last_sync_ns FROM peers ORDER BY name"
        )
        return [PeerMark(*r) for r in rows]

    def set_peer_mark(
        self,
        replica_id: str,
        *,
        name: str | None = None,
        seen_seq: int | None = None,
        acked_seq: int | None = None,
    ) -> None:
        old = self.peer_mark(replica_id)
        self.db.execute(
            "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?)",
            (
                replica_id,
                name if name is not None else old.name,
                seen_seq if seen_seq is not None else old.seen_seq,
                acked_seq if acked_seq is not None else old.acked_seq,
                self._clock(),  # type: ignore[operator]
            ),
        )
