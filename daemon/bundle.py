"""Bundles: a set of changes carried as one file between replicas no network connects.

``export`` writes a replica's records after a sequence number (everything, or what one peer has
not acknowledged yet), with the content of every live file among them, to a bundle file.
``import_bundle`` applies a bundle to another replica of the same tree exactly as a pull from a
peer would be applied: the same planner, the same conflict rules, the same applier (temporary
file, hash check, fsync, rename), with the bundle standing in for the peer's files.

A bundle is an SQLite database, written under a temporary name and renamed into place once
complete and flushed, so a half-written bundle never carries the real name:

- ``meta``: format, version, tree id, the exporting replica's id and name, and the sequence
  range it holds (``since`` < seq <= ``upto``);
- ``records``: one row per record, in the exporter's sequence order, each in its wire form
  (``protocol.messages.record_to_wire``, msgpack), so an import checks a bundle's records as
  strictly as a peer's (paths inside the tree, sane fields);
- ``content``: file content by SHA-256, in chunks of ``CHUNK`` bytes, each content once;
- ``seen``: how far the exporter had seen each other replica's records. An importer learns from
  it how far the exporter has its own records, so its next ``export --since`` that replica
  leaves those out: two replicas that only ever swap bundles still send each change once.

A file that changes while it is exported is left out with its record (the next export carries
it); the bundle then claims to be complete only up to the record before it (``complete``), so an
import never marks as seen what it did not get.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from ..protocol.errors import ProtocolError
from ..protocol.messages import WIRE_VERSION, record_from_wire, record_to_wire
from ..protocol.plan import Op, Step
from ..protocol.record import Kind, Record, is_placeholder
from .applier import Applier, ApplyStats
from .errors import ReplError, TreeMismatchError, UsageError
from .localsync import prefer_policy, pull_applier, pull_steps, rules_widened
from .replica import Replica
from .scanner import ScanStats
from .store import Store

log = logging.getLogger(__name__)

FORMAT = "repld-bundle"
# 2: records may carry the action "adopt". 3: the maker's wire protocol is in meta, and a
# bundle is read only by a repld of the same one: what every replica must compute alike
# (conflict copies' names, for one) changes with it, and a bundle read by another version made
# replicas that differed for good (a trial: one conflict copy named two ways). Also a digest
# of its records, meta and marks (see _digest).
VERSION = 3
CHUNK = 1 << 20  # bytes of content per row
COMMIT_BYTES = 64 << 20  # content written between commits of the bundle being built

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (seq INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, data BLOB NOT NULL);
CREATE TABLE content (sha256 TEXT NOT NULL, part INTEGER NOT NULL, data BLOB NOT NULL,
                      PRIMARY KEY (sha256, part));
CREATE TABLE seen (replica_id TEXT PRIMARY KEY, seen_seq INTEGER NOT NULL);
"""


class BundleError(ReplError):
    """A bundle file that cannot be read, or is not one."""


@dataclass
class ExportReport:
    path: Path
    name: str  # the exporting replica
    since: int
    upto: int
    complete: int  # every record up to this sequence number is in the bundle
    records: int = 0
    files: int = 0  # distinct contents carried
    content_bytes: int = 0
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    scan: ScanStats | None = None


@dataclass
class ImportReport:
    name: str  # the replica that exported the bundle
    since: int
    upto: int
    steps: list[Step] = field(default_factory=list)
    stats: ApplyStats = field(default_factory=ApplyStats)
    scan: ScanStats | None = None
    marked: bool = False  # the exporter's records up to `complete` are now marked as seen
    dry_run: bool = False
    # The exporter's records this replica lacks and the bundle does not hold: (had, since).
    gap: tuple[int, int] | None = None

    @property
    def errors(self) -> list[tuple[str, str]]:
        return (self.scan.errors if self.scan else []) + self.stats.errors


# -- export ---------------------------------------------------------------------------------------


def export(
    rep: Replica,
    out: Path,
    *,
    since: int = 0,
    peer: str = "",
    peer_name: str = "",
    scan: bool = True,
    force: bool = False,
    progress: Callable[[ExportReport], None] | None = None,
) -> ExportReport:
    """Write the records of ``rep`` after ``since``, and the content of its live files, to
    ``out``. ``scan`` first records what changed on disk (the daemon, when it runs, keeps the
    database current itself and holds the write lock: then pass False).

    For a bundle meant for replica ``peer``, the content of versions that replica wrote itself
    is left out (the records stay): it has that content, or a later version that makes the
    record moot. A file it has since lost that content of is an error there, for that path
    only, and a bundle without ``--since`` brings it.

    An earlier bundle of this replica at ``out`` is replaced; one of another replica only with
    ``force`` (it may be on its way to this one, or to a third, not imported yet)."""
    out = out.absolute()
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give the bundle file's name")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such directory")
    if out.exists():
        owner = _bundle_owner(out)
        if owner is None:
            raise UsageError(f"{out} exists and is not a repld bundle; remove it or choose "
                             "another name")  # fmt: skip
        if owner[0] != rep.store.replica_id and not force:
            raise UsageError(
                f"{out} holds a bundle exported by {owner[1]}, another replica: it may not be "
                f"imported everywhere yet. Import it first (`repld import {out}`), or move it "
                "away, or give another name; --force replaces it"
            )
    root = rep.root.resolve()
    if out.resolve().is_relative_to(root):
        # It would be recorded and replicated, the next bundle would carry this one, and so on.
        raise UsageError(f"{out} is inside the replicated tree {root}; write it elsewhere")
    if out.resolve().is_relative_to(rep.cfg.state.resolve()):
        raise UsageError(f"{out} is inside the replica's state directory; write it elsewhere")
    scanned = rep.scan() if scan else None
    store = rep.store
    _drop_stale_temps(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        db.execute("PRAGMA journal_mode=OFF")  # a temporary file: flushed once, at the end
        db.execute("PRAGMA synchronous=OFF")
        db.executescript(_SCHEMA)
        src = store.db
        src.execute("BEGIN")  # one snapshot, even while the daemon records changes
        try:
            upto = int(src.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
            report = ExportReport(out, rep.cfg.name, since, upto, upto, scan=scanned)
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO seen VALUES (?, ?)",
                [(m.replica_id, m.seen_seq) for m in store.peer_marks() if m.seen_seq],
            )
            _export_records(rep, db, since, upto, peer, report, progress)
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("format", FORMAT),
                    ("version", str(VERSION)),
                    ("wire", str(WIRE_VERSION)),
                    ("tree_id", store.tree_id),
                    ("replica_id", store.replica_id),
                    ("name", rep.cfg.name),
                    ("since", str(since)),
                    ("upto", str(upto)),
                    ("complete", str(report.complete)),
                    ("created_ns", str(time.time_ns())),
                    # The replica it is for (--since): the content of its own versions is out.
                    ("for_id", peer),
                    ("for_name", peer_name),
                ],
            )
            db.execute("INSERT INTO meta VALUES ('digest', ?)", (_digest(db),))
            db.execute("COMMIT")
        finally:
            src.execute("COMMIT")
        db.close()
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)  # it holds file content: as private as the tree's owner keeps it
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as e:
        if db is not None:
            db.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, (sqlite3.Error, OSError)):
            raise BundleError(f"{out}: cannot write the bundle ({e})") from None
        raise
    return report


def _digest(db: sqlite3.Connection) -> str:
    """SHA-256 of what a bundle says besides its files' content (each has its own hash): every
    record's bytes, every mark, every meta value but this one. One changed byte there (a trial:
    a digit of `complete`, which made the importer claim to have seen more of the exporter's
    records than it ever made, and stopped the exporter with every peer) is damage found before
    anything is applied."""
    h = hashlib.sha256()
    for seq, path, data in db.execute("SELECT seq, path, data FROM records ORDER BY seq"):
        h.update(b"r%d\0%s\0%d\0" % (seq, path.encode("utf-8", "surrogateescape"), len(data)))
        h.update(data)
    for replica_id, seen_seq in db.execute("SELECT replica_id, seen_seq FROM seen ORDER BY 1"):
        h.update(b"s%s\0%d\0" % (str(replica_id).encode(), seen_seq))
    for key, value in db.execute("SELECT key, value FROM meta WHERE key != 'digest' ORDER BY 1"):
        h.update(b"m%s\0%s\0" % (str(key).encode(), str(value).encode("utf-8", "surrogateescape")))
    return h.hexdigest()


def _bundle_owner(path: Path) -> tuple[str, str] | None:
    """The replica id and name of the bundle at ``path``; None if it is no bundle this repld
    reads."""
    try:
        with Bundle(path) as b:
            return b.replica_id, b.name
    except ReplError:
        return None


def _drop_stale_temps(out: Path) -> None:
    """Temporary files of exports to ``out`` that were killed (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(stale.name.rpartition("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass  # not ours, or a live process (a concurrent export): left alone


def _export_records(
    rep: Replica,
    db: sqlite3.Connection,
    since: int,
    upto: int,
    peer: str,
    report: ExportReport,
    progress: Callable[[ExportReport], None] | None,
) -> None:
    since_commit = 0
    for rec in rep.store.records_since(since):
        if rec.seq > upto:
            break
        if is_placeholder(rec):
            continue  # this replica's own, never sent
        wanted = (rec.kind is Kind.FILE and not rec.deleted and rec.size > 0
                  and rec.modified_by != peer)  # fmt: skip
        if wanted and not _has_content(db, rec.sha256):
            try:
                written = _export_content(rep.root, rec, db)
            except (OSError, _Changed) as e:
                why = str(e) if isinstance(e, _Changed) else (e.strerror or str(e))
                report.left_out.append((rec.path, why))
                report.complete = min(report.complete, rec.seq - 1)
                log.debug("%s: left out of the bundle: %s", rec.path, why)  # (the caller says)
                continue
            report.files += 1
            report.content_bytes += written
            since_commit += written
            if since_commit >= COMMIT_BYTES:
                db.execute("COMMIT")
                db.execute("BEGIN")
                since_commit = 0
        db.execute(
            "INSERT INTO records VALUES (?, ?, ?)",
            (rec.seq, rec.path, msgpack.packb(record_to_wire(rec))),
        )
        report.records += 1
        if progress:
            progress(report)


def _has_content(db: sqlite3.Connection, sha256: str) -> bool:
    row = db.execute("SELECT 1 FROM content WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
    return row is not None


class _Changed(Exception):
    pass


def _export_content(root: Path, rec: Record, db: sqlite3.Connection) -> int:
    """Copy a file's content into the bundle, checked against its record as it is read."""
    fd = os.open(root / rec.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
            raise _Changed("changed since it was scanned; the next export carries it")
        h = hashlib.sha256()
        part = size = 0
        while size < rec.size:
            data = os.read(fd, min(CHUNK, rec.size - size))
            if not data:
                break
            h.update(data)
            db.execute("INSERT INTO content VALUES (?, ?, ?)", (rec.sha256, part, data))
            part += 1
            size += len(data)
    finally:
        os.close(fd)
    if size != rec.size or h.hexdigest() != rec.sha256:
        db.execute("DELETE FROM content WHERE sha256 = ?", (rec.sha256,))
        raise _Changed("changed while it was read; the next export carries it")
    return size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading a bundle -----------------------------------------------------------------------------


class Bundle:
    """A bundle file opened to read; checks its format and every record it hands out."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            raise UsageError(f"{path} is a directory; give a bundle file")
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        not_one = UsageError(f"{path}: not a repld bundle (a bundle is the file `repld export` "
                             "writes)")  # fmt: skip
        try:
            with open(path, "rb") as f:
                if f.read(16) != b"SQLite format 3\0":
                    raise not_one
        except OSError as e:
            raise BundleError(f"{path}: cannot read it ({e.strerror})") from None
        try:
            self._db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
            try:
                meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    raise not_one from None  # another program's SQLite database
                raise
            if meta.get("format") != FORMAT:
                self.close()
                raise not_one  # (a repld database, say)
            for table in ("records", "content", "seen"):  # all there, before anything is applied
                self._db.execute(f"SELECT * FROM {table} LIMIT 0")
        except sqlite3.DatabaseError as e:
            raise BundleError(f"{path}: a damaged bundle ({e}): cut short or changed on the "
                              "way? Copy it again, or export it again") from None
        if meta.get("format") != FORMAT:
            self.close()
            raise UsageError(f"{path}: not a repld bundle")
        if (meta.get("version"), meta.get("wire")) != (str(VERSION), str(WIRE_VERSION)):
            self.close()
            wire = meta.get("wire", "not said")
            raise BundleError(
                f"{path}: made by another repld version (bundle format {meta.get('version')}, "
                f"wire protocol {wire}); this one reads format {VERSION}, wire protocol "
                f"{WIRE_VERSION}: install the same repld version on both machines (`repld "
                "--version` on each), then export it again"
            )
        self._meta = meta
        try:
            self.tree_id = meta["tree_id"]
            self.replica_id = meta["replica_id"]
            self.name = meta["name"]
            self.since = int(meta["since"])
            self.upto = int(meta["upto"])
            self.complete = int(meta["complete"])
            # (Bundles of earlier repld versions do not say.)
            self.for_id = str(meta.get("for_id", ""))
            self.for_name = str(meta.get("for_name", ""))
        except (KeyError, ValueError, TypeError) as e:
            self.close()
            raise BundleError(f"{path}: damaged bundle (meta {e})") from None
        if not all(isinstance(v, str) for v in (self.tree_id, self.replica_id, self.name)):
            self.close()
            raise BundleError(f"{path}: damaged bundle (meta)")

    def _query(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        """Rows of a query on the bundle; a damaged file is a BundleError, not a traceback."""
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            raise BundleError(f"{self.path}: damaged bundle ({e})") from None

    def verify(self) -> None:
        """Read the whole bundle once before anything of it is applied: every page of the
        file, every record, and the hash of every content it carries. A bundle cut short by a
        few bytes, or with a flipped bit, was applied up to the damage (a trial: 43 files
        written, then an error; and `import -n` found nothing wrong)."""
        damaged = f"{self.path}: a damaged bundle"
        again = "cut short or changed on the way? Copy it again, or export it again"
        rows = self._query("PRAGMA quick_check", ())
        if [tuple(r) for r in rows] != [("ok",)]:
            why = "; ".join(str(r[0]) for r in rows[:3])
            raise BundleError(f"{damaged} ({why}): {again}")
        try:
            digest = _digest(self._db)
        except (sqlite3.DatabaseError, TypeError, AttributeError, ValueError) as e:
            raise BundleError(f"{damaged} ({e}): {again}") from None
        if digest != self._meta.get("digest"):
            raise BundleError(f"{damaged} (its records, marks or meta do not match their "
                              f"digest): {again}")  # fmt: skip
        if not self.since <= self.complete <= self.upto:
            raise BundleError(f"{damaged} (meta: since {self.since}, complete {self.complete}, "
                              f"upto {self.upto}): {again}")  # fmt: skip
        for _ in self.records():
            pass  # (each is checked as it is read)
        shas = [r[0] for r in self._query("SELECT DISTINCT sha256 FROM content", ())]
        for sha in shas:
            h = hashlib.sha256()
            with _ContentReader(self, sha) as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            if h.hexdigest() != sha:
                paths = [r.path for r in self.records() if r.sha256 == sha][:3]
                what = ", ".join(map(repr, paths)) if paths else f"content {sha[:8]}"
                raise BundleError(f"{damaged} (the content of {what} does not match its "
                                  f"record): {again}")  # fmt: skip

    def seen(self, replica_id: str) -> int:
        """How far the exporter had seen ``replica_id``'s records."""
        rows = self._query("SELECT seen_seq FROM seen WHERE replica_id = ?", (replica_id,))
        return rows[0][0] if rows and isinstance(rows[0][0], int) else 0

    def _record(self, row: tuple[Any, ...]) -> Record:
        seq, path, data = row
        try:
            rec = record_from_wire(msgpack.unpackb(data, raw=False), placeholder_ok=True)
        except (ProtocolError, ValueError, TypeError, msgpack.UnpackException) as e:
            raise BundleError(f"{self.path}: damaged record {path!r}: {e}") from None
        if rec.path != path or rec.seq != seq:
            raise BundleError(f"{self.path}: damaged record {path!r}")
        return rec

    def records(self) -> Iterator[Record]:
        """Every record, in the exporter's sequence order, a page at a time."""
        seq = -1
        while True:
            rows = self._query(
                "SELECT seq, path, data FROM records WHERE seq > ? ORDER BY seq LIMIT 1000", (seq,)
            )
            if not rows:
                return
            for row in rows:
                rec = self._record(row)
                if not is_placeholder(rec):  # (bundles of older versions have them)
                    yield rec
            seq = rows[-1][0]

    def get(self, path: str) -> Record | None:
        rows = self._query("SELECT seq, path, data FROM records WHERE path = ?", (path,))
        rec = self._record(rows[0]) if rows else None
        return None if rec is None or is_placeholder(rec) else rec

    def open(self, rec: Record) -> BinaryIO:
        """The content of ``rec`` (checked by the applier against the record's hash)."""
        if rec.size == 0:
            return io.BytesIO(b"")  # nothing to carry: an empty file's content is in its record
        if not self._query("SELECT 1 FROM content WHERE sha256 = ? LIMIT 1", (rec.sha256,)):
            made_for = f" ({self.for_name})" if self.for_name else ""
            raise ReplError(
                f"{rec.path}: its content is not in the bundle {self.path}: the replica the "
                f"bundle was made for{made_for} wrote this version, so `export --since` left it "
                "out; a bundle exported without --since carries it"
            )
        return _ContentReader(self, rec.sha256)  # type: ignore[return-value]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ContentReader:
    """Reads one content's chunks in order; ``read(n)`` returns at most n bytes."""

    def __init__(self, bundle: Bundle, sha256: str):
        self._bundle = bundle
        self._sha = sha256
        self._part = 0
        self._buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        if not self._buf:
            rows = self._bundle._query(
                "SELECT data FROM content WHERE sha256 = ? AND part = ?", (self._sha, self._part)
            )
            if not rows:
                return b""
            if not isinstance(rows[0][0], bytes):
                raise BundleError(f"{self._bundle.path}: damaged content {self._sha[:8]}")
            self._part += 1
            self._buf = memoryview(rows[0][0])
        take = len(self._buf) if n < 0 else min(n, len(self._buf))
        out, self._buf = bytes(self._buf[:take]), self._buf[take:]
        return out

    def close(self) -> None:
        self._buf = memoryview(b"")

    def __enter__(self) -> _ContentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- import ---------------------------------------------------------------------------------------


def _unseen(bundle: Bundle, store: Store) -> Iterator[Record]:
    """The bundle's records this replica has not had from the exporter already: those up to
    the mark it keeps for the exporter were applied (a sync, a bundle), and may be older than
    what is here now, or than what a prune dropped (an old bundle would bring deleted files
    back)."""
    had = store.peer_mark(bundle.replica_id).seen_seq
    return (r for r in bundle.records() if r.seq > had)


def import_bundle(
    rep: Replica,
    bundle: Bundle,
    *,
    dry_run: bool = False,
    prefer: str | None = None,
    verbose: bool = False,
    progress: Callable[[ApplyStats], None] | None = None,
) -> ImportReport:
    """Apply a bundle's records to ``rep`` as a pull from the replica that exported it."""
    store = rep.store
    if bundle.tree_id != store.tree_id:
        raise TreeMismatchError(
            f"{bundle.path} holds changes of another tree ({bundle.tree_id}); "
            f"{rep.cfg.path} is a replica of {store.tree_id}"
        )
    if bundle.replica_id == store.replica_id:
        raise UsageError(f"{bundle.path} was exported by this replica; import it on another")
    bundle.verify()  # all of it, before anything is applied (a dry run says so too)
    report = ImportReport(bundle.name, bundle.since, bundle.upto, dry_run=dry_run)
    had = store.peer_mark(bundle.replica_id).seen_seq
    if bundle.since > had:
        report.gap = (had, bundle.since)
    # (This replica is the sync's left side.)
    policy = prefer_policy(prefer, into_left=True, default=rep.cfg.conflict_policy)
    me = store.replica_id
    with store.transaction(commit=False) if dry_run else nullcontext():
        report.scan = rep.scan(clean_temp=not dry_run)
        rep.rules_widened = False  # (the scan forgot the marks already)
        steps = pull_steps(rep, _unseen(bundle, store), policy=policy)
        if dry_run:
            steps = Applier.planned_moves(store, list(steps))
            report.steps = [s for s in steps if s.op is not Op.RECORD or verbose]
            return report
    applier = pull_applier(rep, bundle.open, bundle.get, via=f"bundle from {bundle.name}",
                           policy=policy, verbose=verbose, progress=progress)  # fmt: skip
    report.stats = applier.apply(steps)
    if rules_widened(rep):
        # The bundle brought ignore rules that let through paths whose records were skipped
        # under the old ones: once more (what is here already merges as equal).
        applier = pull_applier(rep, bundle.open, bundle.get, via=f"bundle from {bundle.name}",
                               policy=policy, verbose=verbose, progress=progress)  # fmt: skip
        report.stats.merge(applier.apply(pull_steps(rep, _unseen(bundle, store), policy=policy)))
    report.steps = report.stats.done
    report.stats.errors = [
        # (The applier's words are for a file that changed since its scan: here it is the bundle.)
        (path, f"its content in {bundle.path} does not match its record: the bundle is "
               "damaged; export it again")  # fmt: skip
        if why.startswith("content does not match its record") else (path, why)
        for path, why in report.stats.errors
    ]
    mark = store.peer_mark(bundle.replica_id)
    name = mark.name or bundle.name
    with store.transaction():
        if not report.stats.errors and bundle.since <= mark.seen_seq < bundle.complete:
            # Everything the exporter had up to `complete` is here now: a later sync or bundle
            # from it starts after that. A gap before `since`, or a failed path, leaves the mark.
            store.set_peer_mark(bundle.replica_id, name=name, seen_seq=bundle.complete)
            report.marked = True
        theirs = bundle.seen(me)
        if theirs > mark.acked_seq:
            store.set_peer_mark(bundle.replica_id, name=name, acked_seq=theirs)
    return report
