"""The scanner: compares the tree on disk with the records and commits one event per change.

A file is rehashed only when its size, mtime, mode or inode differ from its record; a file whose
inode, size and mtime match a record that has vanished from its old path is a move and is not
hashed again (its guid follows it). Directories and symlinks are recorded (symlinks never
followed). Ignored subtrees are never entered. A directory that cannot be read is reported and its
records are left alone: an unreadable directory is not a deleted one.

A scan walks one directory at a time and reads only that directory's records, so memory does not
grow with the tree; all its events are one transaction. In a whole walk the store writes the rows
from a thread while the walk goes on (``Store.write_behind``), and a file that neither a record
nor a record's inode knows is recorded straight from its directory entry (``_new_file``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.errors import UnsafePathError
from ..protocol.record import (
    MIN_BLOCK,
    Action,
    Kind,
    Record,
    block_size_for,
    check_path,
    is_temp_name,
    mode_of,
    new_guid,
)
from ..protocol.version import VersionVector
from .ignore import Ignore
from .mounts import Mounts, not_mounted_message
from .mounts import note as note_mounts
from .store import CTIME_SLACK_NS, Store, checked_at

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


@dataclass
class ScanStats:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    moved: int = 0  # of the created: files found moved (their old paths count as deleted)
    hashed_bytes: int = 0
    files: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    # Paths that cannot be replicated at all (a FIFO, a socket, a name that is not UTF-8): said,
    # but not failures: nothing a sync could do about them, short of an ignore rule.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # (action, path), or ("move", path, old path), when verbose
    changes: list[tuple[str, ...]] = field(default_factory=list)
    # A rejoin's adopted paths found as the old database had them, and found changed since
    # (see replica.continue_history).
    kept: int = 0
    edited: int = 0
    # Of the deleted: paths under a .git/objects directory (git's own, see is_git_object).
    deleted_git_objects: int = 0

    @property
    def events(self) -> int:
        return self.created + self.updated + self.deleted


GIT_OBJECTS = "/.git/objects/"


def is_git_object(path: str) -> bool:
    """Whether ``path`` is in a git repository's object store: git deletes thousands of them
    at once as routine (`git gc` packs its loose objects), which the mass-delete circuit
    breaker does not count as the user's files gone."""
    return GIT_OBJECTS in f"/{path}"


def hash_file_stat(path: str | Path) -> tuple[str, bytes, int, os.stat_result]:
    """(SHA-256 hex of the whole file, concatenated block digests, size, stat after reading).

    The blocks always match ``block_size_for`` of the size returned: a file whose size crossed a
    block size boundary while it was read is read again. Opened non-blocking: a FIFO that took a
    file's place since it was seen does not hang the scan (callers check the mode)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        bsize = MIN_BLOCK
        before = os.fstat(fd)
        for _ in range(3):
            sha, blocks, size, bsize = _hash_fd(fd, bsize)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return sha, blocks, size, st
            # Written to while it was read: the hash is of neither version. Recorded with the
            # stat after reading, it would pass for the final content, and never be read again.
            steady = (st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
                before.st_size, before.st_mtime_ns, before.st_ctime_ns
            )
            if steady and block_size_for(size) == bsize:
                return sha, blocks, size, st
            os.lseek(fd, 0, os.SEEK_SET)
            bsize, before = block_size_for(size), st
        raise OSError(errno.EAGAIN, "it keeps changing while it is read; read again later")
    finally:
        os.close(fd)


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _hash_fd(fd: int, bsize: int) -> tuple[str, bytes, int, int]:
    """(SHA-256 hex, block digests, size, the block size they are of: ``bsize``, or a bigger
    one if the file is big enough to need it)."""
    first = os.read(fd, bsize)
    if len(first) < bsize or not (peek := os.read(fd, READ_CHUNK)):
        # One block (nearly every file): hash once, the file digest is the block digest; no
        # fstat needed to know the block size, as every size up to MIN_BLOCK has MIN_BLOCK.
        digest = hashlib.sha256(first).digest()
        return digest.hex(), digest, len(first), bsize
    if (want := block_size_for(os.fstat(fd).st_size)) > bsize:
        os.lseek(fd, 0, os.SEEK_SET)  # a big file: blocks of its own size
        return _hash_fd(fd, want)
    whole = hashlib.sha256(first)
    blocks = [hashlib.sha256(first).digest()]
    total = len(first)
    block = hashlib.sha256()
    in_block = 0
    data = peek
    while data:
        while data:
            room = bsize - in_block
            part, data = data[:room], data[room:]
            whole.update(part)
            block.update(part)
            in_block += len(part)
            total += len(part)
            if in_block == bsize:
                blocks.append(block.digest())
                block = hashlib.sha256()
                in_block = 0
        data = os.read(fd, READ_CHUNK)
    if in_block:
        blocks.append(block.digest())
    return whole.hexdigest(), b"".join(blocks), total, bsize


MTIME_LIMIT = (1 << 63) - 1  # nanoseconds either side of 1970 that a record can hold


def _clamped(ns: int) -> int:
    """A directory's or symlink's mtime, within what a record holds (only a file's is compared
    with the disk, and a file outside it is not replicated: see Scanner._check_file)."""
    return max(-MTIME_LIMIT, min(MTIME_LIMIT, ns))


def _year(ns: int) -> str:
    try:
        return str(time.gmtime(ns // 10**9).tm_year)
    except (OverflowError, OSError, ValueError):
        return "?"


def _unchanged_file(rec: Record, st: os.stat_result) -> bool:
    """A live file's record that the stat of a regular file matches: no need to read it."""
    return (
        rec.kind is Kind.FILE
        and not rec.deleted
        and stat.S_ISREG(st.st_mode)
        and rec.size == st.st_size
        and rec.mtime_ns == st.st_mtime_ns
        and rec.ino == st.st_ino
        and rec.mode == mode_of(st.st_mode)
        and st.st_ctime_ns <= checked_at(rec)
    )


def _glob_escape(path: str) -> str:
    """``path`` as a gitignore pattern that matches just it."""
    return "".join("\\" + c if c in "*?[]!#\\ " else c for c in path)


def kind_of(mode: int) -> Kind | None:
    if stat.S_ISREG(mode):
        return Kind.FILE
    if stat.S_ISDIR(mode):
        return Kind.DIR
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    return None


class Scanner:
    def __init__(
        self,
        store: Store,
        root: Path,
        ignore: Ignore | None = None,
        *,
        verbose: bool = False,
        clean_temp: bool = False,
        progress: Callable[[ScanStats], None] | None = None,
        rehash: bool = False,
        adopt: bool = False,
        skip_deletes: bool = False,
        forget_mounts: bool = False,
        other_root: Callable[[Path], Path | None] | None = None,
        said_skipped: set[tuple[str, str]] | None = None,
    ):
        self.store = store
        # Says whether a new directory is another replica's root (its config), to leave alone.
        self.other_root = other_root
        self.said_skipped = said_skipped  # what earlier scans logged already (then at DEBUG)
        # Mount points found not mounted are walked as they are now (see mounts.py).
        self.forget_mounts = forget_mounts
        # Record everything but deletions (the circuit breaker holds those back, and the rest
        # of the scan must not wait with them).
        self.skip_deletes = skip_deletes
        self.rehash = rehash  # read every file, even one whose stat matches its record
        self.root = root
        self._root_s = str(root)
        self.ignore = ignore or Ignore(root)
        self.verbose = verbose
        self.clean_temp = clean_temp
        self.progress = progress
        self.me = store.replica_id
        self.stats = ScanStats()
        self._whole_walk = False
        self._known_inos: set[int] | None = None  # None: not loaded (see _inodes)
        # Paths found gone, their tombstones not recorded yet (see _tombstone), in order.
        self._later: dict[str, Record] = {}
        # Old paths of files found moved, tombstoned already in this scan (see _tombstone_now).
        self._moved_away: set[str] = set()
        self._fresh = VersionVector()  # what a path with no record starts from (see scan)
        self._first_version = VersionVector().bump(self.me).encode()
        # What a path never recorded here is: new, or found at a join (see Action.ADOPT).
        self._create = Action.ADOPT if adopt else Action.CREATE

    # -- entry points -------------------------------------------------------------------------

    def scan(self, paths: Iterable[str] | None = None) -> ScanStats:
        """Scan the whole tree, or only ``paths`` (and what is below them); one transaction."""
        self.stats = ScanStats()
        self._start_seq = self.store.seq
        self._later, self._moved_away = {}, set()
        # A path with no record may have had one that prune dropped, a tombstone other
        # replicas may still hold: this replica's first event on it must count higher than any
        # of its events on the paths pruned, or that tombstone would win over it.
        floor = self.store.pruned_floor
        self._fresh = VersionVector.of({self.me: floor})
        self._first_version = self._fresh.bump(self.me).encode()
        self._mounts = Mounts(self.store, self._root_s)
        self._found_mounts: set[str] = set()
        self._held_mounts: set[str] = set()
        try:
            self._root_dev = os.stat(self._root_s).st_dev
        except OSError:
            self._root_dev = -1
        try:
            self._scan(paths)
        finally:
            self._whole_walk, self._known_inos, self._later = False, None, {}
            self._moved_away = set()
        return self.stats

    def _scan(self, paths: Iterable[str] | None) -> None:
        with self.store.transaction():
            if paths is None:
                self._whole_walk = True
                with self.store.write_behind():  # SQLite writes on the other core
                    self._walk("")
                    self._emit_upto(None)
            else:
                todo = sorted(set(paths))
                linked: list[int] = []  # inodes of named files that have other names
                for path in todo:
                    self._scan_path(path, linked)
                # A file with other names (hard links): a write through one name changes them
                # all, and the watcher names only the one written to.
                others: set[str] = set()
                for ino in linked:
                    others.update(p for (p,) in self.store.execute(
                        "SELECT path FROM records WHERE ino = ? AND deleted = 0", (ino,)))
                for path in sorted(others - set(todo)):
                    self._scan_path(path, [])
                self._emit_upto(None)
            self._note_mounts(whole=paths is None)

    def _note_mounts(self, *, whole: bool) -> None:
        known = set(self._mounts.known)
        if whole:  # every mount point walked into, and those held back
            found = self._found_mounts | self._held_mounts
        else:
            found = known | self._found_mounts
        if self.forget_mounts:
            found -= {m for m in known if self._mounts.missing(m)}
        if found != known:
            note_mounts(self.store, found)

    def _mount_held(self, path: str) -> bool:
        """Whether ``path`` is a mount point noted earlier and not mounted now: then nothing
        under it is walked, and nothing recorded as deleted (see mounts.py)."""
        if path not in self._mounts.known or self.forget_mounts or not self._mounts.missing(path):
            return False
        if path not in self._held_mounts:
            self._held_mounts.add(path)
            self._error(path, not_mounted_message(path))
        return True

    def _walks_into(self, path: str, st: os.stat_result) -> None:
        """``path`` (a directory) is walked: note it if a file system is mounted there."""
        if st.st_dev != self._root_dev and not any(
            path.startswith(m + "/") for m in self._found_mounts
        ):
            self._found_mounts.add(path)

    def _scan_path(self, path: str, linked: list[int]) -> None:
        if not path or path == ".":
            self._walk("")
            return
        try:
            check_path(path)
        except UnsafePathError as e:
            if not os.path.lexists(self.root / path):
                return  # gone (renamed to a valid name, say): nothing to record, nor to report
            try:
                path.encode()
            except UnicodeEncodeError:
                # As the walk says it, so that the walk and this agree on what is wrong.
                self._skip(path, "its name is not valid UTF-8; rename it to replicate it")
                return
            self.stats.errors.append((path, str(e)))
            return
        parts = path.split("/")
        for i in range(1, len(parts)):
            if self.ignore("/".join(parts[:i]), True):
                return
        held = None if self.forget_mounts else self._mounts.not_mounted_above(path)
        if held is not None:
            self._mount_held(held)
            return
        # Parents first: a new file in a new directory needs the directory's record too.
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            st = self._lstat(parent)
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._scan_entry(parent, st, self.store.get(parent), descend=False)
                return
            rec = self.store.get(parent)
            if rec is None or rec.deleted or parent in self._later:
                if self._state(parent):
                    return  # nothing in a state directory is recorded
                self._scan_entry(parent, st, rec, descend=False)
        st = self._lstat(path)
        if st is not None and self.ignore(path, stat.S_ISDIR(st.st_mode)):
            return
        if st is not None and st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
            linked.append(st.st_ino)
        self._scan_entry(path, st, self.store.get(path), descend=True)

    def _lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.root / path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None

    # -- the walk -----------------------------------------------------------------------------

    def _walk(self, top: str) -> None:
        stack = [top]
        while stack:
            rel = stack.pop()
            for sub in reversed(self._scan_dir(rel)):
                stack.append(sub)

    def _scan_dir(self, rel: str) -> list[str]:
        """Scan one directory's entries; return its subdirectories to walk next."""
        abs_dir = f"{self._root_s}/{rel}" if rel else self._root_s
        try:
            with os.scandir(abs_dir) as it:
                entries = {e.name: e for e in it}
        except FileNotFoundError:
            return []
        except OSError as e:
            self._error(rel or ".", f"cannot read directory: {e.strerror}")
            return []
        # What the records say, compared first in its short form (a rescan finds most entries
        # unchanged); the whole records of the directory are read once one is needed.
        known = {row[0].rpartition("/")[2]: row for row in self.store.children_stat(rel)}
        records: dict[str, Record] | None = None
        subdirs: list[str] = []
        prefix = f"{rel}/" if rel else ""
        # In a whole walk, a file no record has and whose inode no record has is new: recorded
        # straight from the directory entry (no lstat; the fstat after reading gives the stat).
        new_files = self._whole_walk
        for name in sorted(entries.keys() | known.keys()):
            path = prefix + name
            if is_temp_name(name):
                if self.clean_temp:  # left by a crash; only ever a temp name, never tracked
                    try:
                        os.unlink(f"{self._root_s}/{path}")
                    except OSError:
                        pass
                continue
            entry = entries.get(name)
            row = known.get(name)
            if entry is not None and path in self._later:
                # Found gone earlier in this scan (a path scan looked before the walk), and
                # here again: its tombstone first, then this is a new entry over it.
                self._emit_upto(path)
                records = None
                row = (*row[:2], 1, *row[3:]) if row is not None else None
            if entry is None:
                if row is not None and not row[2] and not self._mount_held(path):
                    if records is None:
                        records = self._records_of(rel)
                    self._gone(records[name])
                continue
            if not name.isascii():
                # A name from the directory has no "/" or NUL and is never "", "." or "..", and
                # rel was checked: only its encoding can make the path unsafe.
                try:
                    check_path(path)
                except UnsafePathError:
                    self._skip(path, "its name is not valid UTF-8; rename it to replicate it")
                    continue
            if row is None and new_files and self._new_file(path, entry):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                st = None
            except OSError as e:
                if e.errno == errno.ENAMETOOLONG:
                    size = len(os.fsencode(path))
                    self._skip(path, f"its path is too long for this system ({size} bytes "
                                     "under the root); move it higher up to replicate it")
                else:
                    self._error(path, f"cannot stat: {e.strerror}")
                continue
            if st is not None and self.ignore(path, stat.S_ISDIR(st.st_mode)):
                continue
            if row is None and st is not None and stat.S_ISDIR(st.st_mode) and self._state(path):
                continue
            rec = None
            if row is not None:
                if st is not None and not row[2]:
                    # What _scan_entry would find for an unchanged file or directory, in fewer
                    # calls (a rescan).
                    kind, mode = row[1], mode_of(st.st_mode)
                    if (
                        kind == "file"
                        and not self.rehash
                        and stat.S_ISREG(st.st_mode)
                        and row[3:7] == (mode, st.st_mtime_ns, st.st_size, st.st_ino)
                        and st.st_ctime_ns <= row[7] - CTIME_SLACK_NS
                    ):
                        self.stats.files += 1
                        continue
                    if kind == "dir" and stat.S_ISDIR(st.st_mode) and row[3] == mode:
                        if not self._mount_held(path):
                            self._walks_into(path, st)
                            subdirs.append(path)
                        continue
                if records is None:
                    records = self._records_of(rel)
                rec = records[name]
            if self._scan_entry(path, st, rec, descend=False) and not self._mount_held(path):
                assert st is not None
                self._walks_into(path, st)
                subdirs.append(path)
        if self.progress is not None:
            self.progress(self.stats)
        return subdirs

    def _records_of(self, rel: str) -> dict[str, Record]:
        """The records of the directory ``rel``'s entries, by name."""
        return {r.path.rpartition("/")[2]: r for r in self.store.children(rel)}

    def _new_file(self, path: str, entry: os.DirEntry[str]) -> bool:
        """Record a file at a path with no record, if it is plainly a new file (a regular file
        whose inode no record has, so not moved here); False: not handled, scan it as usual."""
        known = self._inodes()
        assert known is not None
        try:
            if entry.inode() in known or not entry.is_file(follow_symlinks=False):
                return False
        except OSError:
            return False
        if self.ignore(path, False):
            return True
        try:
            sha, blocks, size, st = hash_file_stat(f"{self._root_s}/{path}")
        except OSError:
            return False  # gone or unreadable: the usual way reports what is there now
        ino = st.st_ino
        if ino in known or not stat.S_ISREG(st.st_mode) or abs(st.st_mtime_ns) > MTIME_LIMIT:
            return False  # replaced since the directory was read (or see _check_file)
        self.stats.files += 1
        self.stats.hashed_bytes += size
        self.store.put_local(path, new_guid(), "file", self._first_version, self._create.value,
                             mode_of(st.st_mode), st.st_mtime_ns, size, sha, blocks, ino)
        known.add(ino)
        self.stats.created += 1
        if self.verbose:
            self.stats.changes.append((self._create.value, path))
        return True

    def _scan_entry(
        self, path: str, st: os.stat_result | None, rec: Record | None, *, descend: bool
    ) -> bool:
        """Record what changed at ``path``; True if it is a directory to walk."""
        if st is not None and path in self._later:
            self._emit_upto(path)  # found gone earlier in this scan, and here again (see _scan_dir)
            rec = self.store.get(path)
        if st is None:
            if rec is not None and not rec.deleted:
                self._gone(rec)
            return False
        kind = kind_of(st.st_mode)
        if kind is None:
            what = ("a socket" if stat.S_ISSOCK(st.st_mode) else "a FIFO (named pipe)"
                    if stat.S_ISFIFO(st.st_mode) else "a device node"
                    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
            self._skip(path, f"{what}, not a regular file, directory or symlink (a line "
                             f"`/{_glob_escape(path)}` in .repldignore silences this)")  # fmt: skip
            if rec is not None and not rec.deleted:
                # What was recorded there (a file, a directory and all in it) is gone from the
                # tree as repld sees it: its peers must hear so, or they keep it for good and
                # wait for ever for a version this replica no longer has.
                self._gone(rec)
            return False
        if rec is not None and not rec.deleted and rec.kind is Kind.DIR and kind is not Kind.DIR:
            # Now: the children's tombstones go before the record of what replaces them.
            self._gone_subtree(path, later=False)
        if kind is Kind.DIR and (rec is None or rec.deleted) and self._state(path):
            return False
        if kind is Kind.DIR:
            self._check_dir(path, st, rec)
            if descend:
                self._walk(path)
                return False
            return True
        if kind is Kind.SYMLINK:
            self._check_symlink(path, st, rec)
        else:
            self._check_file(path, st, rec)
        return False

    # -- one entry ----------------------------------------------------------------------------

    def _event(self, rec: Record | None, new: Record, action: Action) -> None:
        base = rec.version if rec is not None else self._fresh
        guid = rec.guid if rec is not None and not rec.deleted else new.guid
        self.store.put(new.with_(version=base.bump(self.me), action=action, guid=guid), local=True)
        if action in (Action.CREATE, Action.ADOPT):
            self.stats.created += 1
        elif action is Action.UPDATE:
            self.stats.updated += 1
        else:
            self.stats.deleted += 1
            if is_git_object(new.path):
                self.stats.deleted_git_objects += 1
        if self.verbose:
            self.stats.changes.append((action.value, new.path))

    def _check_dir(self, path: str, st: os.stat_result, rec: Record | None) -> None:
        mode = mode_of(st.st_mode)
        if rec is not None and not rec.deleted and rec.kind is Kind.DIR:
            if rec.mode != mode:
                self._event(rec, rec.with_(mode=mode, mtime_ns=_clamped(st.st_mtime_ns)),
                            Action.UPDATE)  # fmt: skip
            return
        new = Record(path, new_guid(), Kind.DIR, VersionVector(), mode=mode,
                     mtime_ns=_clamped(st.st_mtime_ns))  # fmt: skip
        self._event(rec, new, self._create if rec is None or rec.deleted else Action.UPDATE)

    def _check_symlink(self, path: str, st: os.stat_result, rec: Record | None) -> None:
        try:
            target = os.readlink(self.root / path)
        except OSError as e:
            self._error(path, f"cannot read link: {e.strerror}")
            return
        live = rec is not None and not rec.deleted and rec.kind is Kind.SYMLINK
        if live and rec is not None and rec.target == target:
            return
        # Its mtime is when its target was set (a symlink cannot be edited, only made anew): it
        # decides a conflict by "newer modification" like a file's. (Only a new target is a
        # change; the mtime alone is not, as for directories.)
        new = Record(path, new_guid(), Kind.SYMLINK, VersionVector(), target=target,
                     mtime_ns=_clamped(st.st_mtime_ns))  # fmt: skip
        self._event(rec, new, self._create if rec is None or rec.deleted else Action.UPDATE)

    def _check_file(self, path: str, st: os.stat_result, rec: Record | None) -> None:
        if not -MTIME_LIMIT <= st.st_mtime_ns <= MTIME_LIMIT:
            # (SQLite and the wire take 64-bit integers: nanoseconds from 1677 to 2262.)
            self._skip(path, f"its modification time (the year {_year(st.st_mtime_ns)}) is "
                       "outside what repld records (1678 to 2261): `touch` it to replicate it")  # fmt: skip
            return
        self.stats.files += 1
        if rec is not None and not self.rehash and _unchanged_file(rec, st):
            return
        mode = mode_of(st.st_mode)
        live = rec is not None and not rec.deleted and rec.kind is Kind.FILE
        moved = None if live else self._moved_from(path, st)
        if moved is not None:
            sha, blocks, size = moved.sha256, moved.blocks, moved.size
        else:
            try:
                sha, blocks, size, st = hash_file_stat(f"{self._root_s}/{path}")
            except FileNotFoundError:
                if live and rec is not None:
                    self._gone(rec)
                return
            except PermissionError as e:
                if live and rec is not None and (rec.size, rec.mtime_ns) == (
                    st.st_size, st.st_mtime_ns
                ):
                    # Made unreadable by its owner (chmod 000): its content is as recorded, as
                    # far as size and mtime tell; a change of its mode alone is recorded.
                    if rec.mode != mode:
                        self._event(rec, rec.with_(mode=mode, ino=st.st_ino), Action.UPDATE)
                    else:
                        self.store.set_ino(path, st.st_ino, st.st_ctime_ns)
                    return
                self._error(path, f"cannot read: {e.strerror}")
                return
            except OSError as e:
                self._error(path, f"cannot read: {e.strerror}")
                return
            if not stat.S_ISREG(st.st_mode):
                self._error(path, "cannot read: no longer a regular file")  # the next scan sees it
                return
            self.stats.hashed_bytes += size
        if live and rec is not None:
            version, guid, action = rec.version.bump(self.me), rec.guid, Action.UPDATE
        elif moved is not None:
            # The destination may have a history here (a tombstone, another kind): continue it,
            # or other replicas' newer record of the path would win over the moved file.
            base = rec.version if rec is not None else self._fresh
            version, guid, action = base.bump(self.me), moved.guid, Action.CREATE
        else:
            base = rec.version if rec is not None else self._fresh
            version, guid, action = base.bump(self.me), new_guid(), self._create
            if rec is not None and rec.kind is not Kind.DIR and not rec.deleted:
                action = Action.UPDATE  # a symlink became a file
        mtime_ns, ino = st.st_mtime_ns, st.st_ino
        if live and rec is not None and rec.sha256 == sha and (rec.mode, rec.mtime_ns) == (
            mode, mtime_ns
        ):
            self.store.set_ino(path, ino, st.st_ctime_ns)  # same file (new inode?): cache only
            return
        note = f"moved from {moved.path}" if moved is not None else ""
        if moved is not None:
            self.stats.moved += 1
        self.store.put_local(path, guid, "file", version.encode(), action.value, mode, mtime_ns,
                             size, sha, blocks, ino, note)  # fmt: skip
        if self._known_inos is not None:
            self._known_inos.add(ino)
        if action in (Action.CREATE, Action.ADOPT):
            self.stats.created += 1
        else:
            self.stats.updated += 1
        if self.verbose:
            if moved is not None:
                self.stats.changes.append(("move", path, moved.path))
            else:
                self.stats.changes.append((action.value, path))
        if moved is not None and self._lstat(moved.path) is None:
            # The old path's tombstone right after the move: a peer gets both in one page, and
            # renames its copy of the file instead of copying it and deleting the original.
            self._tombstone_now(moved.path)

    def _inodes(self) -> set[int] | None:
        """In a whole walk, the inodes that records of files have (None: ask the store).

        A whole walk asks "was this new file moved here?" once per new file: one read of the
        known inodes answers "no" for most without a query (and the first scan of a big tree
        has no records at all). Read when first needed, so an unchanged rescan never reads
        them; the files recorded since are in the read or added by _check_file/_new_file."""
        if self._known_inos is None and self._whole_walk:
            self._known_inos = self.store.file_inodes()
        return self._known_inos

    def _moved_from(self, path: str, st: os.stat_result) -> Record | None:
        """A live record elsewhere for this very inode whose old path no longer holds it."""
        if (known := self._inodes()) is not None and st.st_ino not in known:
            return None
        rows = self.store.execute(
            "SELECT path FROM records WHERE ino = ? AND ino != 0 AND kind = 'file' "
            "AND (deleted = 0 OR seq > ?) AND size = ? AND mtime_ns = ? AND path != ? LIMIT 4",
            (st.st_ino, self._start_seq, st.st_size, st.st_mtime_ns, path),
        ).fetchall()
        for (old_path,) in rows:
            old_st = self._lstat(old_path)
            if old_st is None or old_st.st_ino != st.st_ino:
                old = self.store.get(old_path)
                if old is not None and old.sha256:
                    return old
        return None

    def _gone(self, rec: Record) -> None:
        if self.skip_deletes or rec.path in self._later or rec.path in self._moved_away:
            # (Found gone already in this scan: a path scan of `rm -rf d` gets every file of
            # d, and each one finds d gone; its subtree is read once, not once a file. Or the
            # old path of a file moved to a name the walk met first: tombstoned then.)
            return
        if rec.kind is Kind.DIR:
            self._gone_subtree(rec.path)
        self._tombstone(rec)

    def _gone_subtree(self, path: str, *, later: bool = True) -> None:
        if self.skip_deletes:
            return
        below = [r for r in self.store.iter_paths(path, include_prefix=False) if not r.deleted]
        for r in reversed(below):
            self._tombstone(r, later=later)

    def _tombstone(self, rec: Record, *, later: bool = True) -> None:
        """Record that ``rec``'s path is gone: at the end of the scan (``later``), or now.

        A scan records what it finds in path order, so the old paths of a moved tree may come
        long before the new ones (``mv Photos Pictures``): recorded first, a peer that gets them
        pages apart would delete its copy of each file before it learns where the file went,
        and copy it back or fetch it again. Kept until the end (or until the move that takes
        the path's file away, see _check_file), the tombstones follow what was moved, in the
        order they were found: children before their directory, as always."""
        if later:
            self._later.setdefault(rec.path, rec)
            return
        self._later.pop(rec.path, None)
        self._deleted(rec)

    def _deleted(self, rec: Record) -> None:
        self._event(rec, rec.with_(deleted=True), Action.DELETE)

    def _tombstone_now(self, path: str) -> None:
        """The tombstone of ``path`` now, if it is recorded alive (a file moved away)."""
        if self.skip_deletes:
            return
        self._later.pop(path, None)
        self._moved_away.add(path)
        rec = self.store.get(path)
        if rec is not None and not rec.deleted:
            self._deleted(rec)

    def _emit_upto(self, path: str | None) -> None:
        """Record the tombstones kept for later, in order, up to ``path``'s (all: None)."""
        while self._later:
            first, rec = next(iter(self._later.items()))
            del self._later[first]
            self._deleted(rec)
            if first == path:
                return

    def _error(self, path: str, message: str) -> None:
        log.info("%s: %s", path, message)  # the caller shows it (the command line, the daemon)
        self.stats.errors.append((path, message))

    def _state(self, path: str) -> bool:
        """Whether the new directory ``path`` is a repld state directory (another replica's, or
        this one's under another config): never recorded, its secret key must not travel; or
        the root of another replica."""
        where = f"{self._root_s}/{path}"
        if not (os.path.exists(f"{where}/repld.db") or os.path.exists(f"{where}/keys/curve.secret")):
            other = self.other_root(Path(where)) if self.other_root is not None else None
            if other is None:
                return False  # (init makes the keys first, the database next)
            # Recorded here too, each of its files would have two replicas writing it, each
            # taking the other's writes for edits of its own.
            self._skip(path, f"the root of another replica ({other}); replicas must not "
                             "overlap: move one, or ignore it in .repldignore")  # fmt: skip
            return True
        # (At DEBUG: every scan that passes by says it again, and status lists it anyway.)
        self._skip(path, "a repld state directory (its secret key must not travel); keep it "
                         "outside the tree, or ignore it in .repldignore",
                   level=logging.DEBUG)  # fmt: skip
        return True

    def _skip(self, path: str, why: str, *, level: int = logging.INFO) -> None:
        if self.said_skipped is not None:
            if (path, why) in self.said_skipped:
                level = logging.DEBUG
            elif len(self.said_skipped) < 10_000:
                self.said_skipped.add((path, why))
        log.log(level, "%s: not replicated: %s", path, why)
        self.stats.skipped.append((path, why))
