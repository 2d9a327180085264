"""The applier: carries out sync steps on the local tree, never losing a change.

Promises:
- Nothing outside the root is touched: every path is checked, and no parent on the way to it may be
  a symlink (writing "through" a symlink is refused).
- A file is written to a temporary file in its own directory, checked against its SHA-256, given
  its mode and mtime, made durable and renamed into place. To keep durability cheap, temporary
  files are gathered in batches: one ``syncfs`` makes a whole batch durable before the renames
  (on another thread, while the next batch is written), a second one makes the renames durable
  before the batch's records are committed (one transaction). A ``kill -9`` at any moment
  leaves no partial file under a tracked name. New files copied from a replica on this machine
  are filled by a second process (see copyproc) while this one plans, links and records; they
  are checked the same way, and one it could not copy is copied here.
- Before a file is replaced or removed, its state on disk is compared with the local record the
  step was planned against; if it changed (an edit nobody has recorded yet), the path is rescanned
  and planned again, which turns it into a conflict: it is never overwritten.
- Removals run last, children before parents; a directory that still holds something is kept,
  and recorded as alive again, rather than given a false tombstone. When it was to be replaced by
  a file or symlink, that one is kept beside it as a conflict copy (the name and record derive
  from the losing version only, so every replica that keeps the directory makes the same copy),
  and only then is the directory recorded as newer than the file: nothing is lost.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import resource
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

from ..protocol.plan import Op, Step
from ..protocol.reconcile import Conflict, Side, conflict_copy_record
from ..protocol.record import (
    TEMP_PREFIX,
    Action,
    Kind,
    Record,
    check_path,
    derived_guid,
    mode_of,
    parent_of,
)
from ..protocol.version import Order, VersionVector
from .copyproc import CopyProcess
from .diskio import (
    COPY_CHUNK,
    OpenFiles,
    copy_hashed,
    open_regular,
    rename_noreplace,
    special_kind,
    syncfs,
    written_elsewhere,
)
from .errors import (
    ApplyStopped,
    ChangedOnDisk,
    FsError,
    InTheWay,
    InUse,
    ParentNotDir,
    ReplError,
    StoreError,
)
from .mounts import Mounts, not_mounted_message
from .scanner import hash_file_stat
from .store import HASH_MATCHES, Store, checked_at
from .versions import Keeper, VersionError

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH_FILES = 2000
COPY_PROCESS_AFTER = 64  # new files written here before the copy process is worth its fork
BATCH_BYTES = 256 << 20


class _Background(Generic[T]):
    """One call on a thread of its own (a syncfs: the GIL is free while it waits for the disk).
    ``wait`` joins it and returns what it returned or raises what it raised; ``join`` only
    joins it."""

    def __init__(self, fn: Callable[[], T]):
        self._error: BaseException | None = None
        self._result: T | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="repld-sync",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._result = fn()
        except BaseException as e:
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def wait(self) -> T:
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._result  # type: ignore[return-value]


Fetch = Callable[[Record], BinaryIO]
"""Opens the content of a record from elsewhere (the other replica, a peer, a bundle)."""


@dataclass
class ApplyStats:
    written: int = 0
    written_bytes: int = 0
    copied_locally: int = 0
    copied_locally_bytes: int = 0  # of written_bytes: taken from a file here, not the source
    moved: int = 0  # files the other side moved, renamed here from their old paths (not written)
    deleted: int = 0
    recorded: int = 0
    conflicts: int = 0
    kept_dirs: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    done: list[Step] = field(default_factory=list)  # with keep_steps
    done_paths: set[str] = field(default_factory=set)  # always
    # Files of the source (the other replica, the peer) whose content did not match their
    # records: the source's next scan must read them again, whatever their stat says.
    stale_sources: list[str] = field(default_factory=list)

    def merge(self, other: ApplyStats) -> None:
        """Add ``other``'s counts and lists to these (two applies reported as one)."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, set):
                mine.update(getattr(other, f.name))
            elif isinstance(mine, list):
                mine.extend(getattr(other, f.name))
            else:
                setattr(self, f.name, mine + getattr(other, f.name))


_Failed = list[tuple["_Pending", OSError]]


def _files(batch: list[_Pending]) -> list[_Pending]:
    """The entries of a batch that have a temporary file to flush and install."""
    return [p for p in batch if p.tmp is not None or p.fd is not None]


@dataclass
class _Pending:
    step: Step
    tmp: Path | None = None  # a named temporary file (or symlink) beside the target
    fd: int | None = None  # an unnamed one (O_TMPFILE), linked to its name at install
    job: int | None = None  # the copy process's job that makes ``fd`` (see _collect)


# Batches of at most this many files are made durable file by file (fdatasync, then fsync of
# their directories), larger ones with syncfs.
SMALL_BATCH = 8

# Unnamed temporary files held open (each holds a file descriptor until installed): a whole
# batch, and the batch before it while that one is being made durable.
MAX_UNNAMED = 2 * BATCH_FILES
FDS_SPARE = 256  # descriptors left for everything else (sockets, the database, inotify)


def _moved_from(other: Record, rec: Record) -> bool:
    """Whether ``other``, a live record here with ``rec``'s hash, is the very file ``rec`` is,
    moved by the other side (its scan kept the guid) from ``other``'s path."""
    return (other.guid == rec.guid and other.path != rec.path and other.kind is Kind.FILE
            and (other.size, other.mode, other.mtime_ns) == (rec.size, rec.mode, rec.mtime_ns))  # fmt: skip


def _drops_local_edit(step: Step, me: str) -> bool:
    """Whether ``step`` replaces an edit made here that lost a conflict with no conflict copy
    (--prefer remote, conflict_policy newest): that edit is then kept as a version.

    Decided here, the step says so. Decided on another replica (which had this edit's record,
    not its content), the version that comes holds the winner's concurrent edit and the event
    of that decision: two or more events this replica's version lacks, over a file whose
    content is this replica's own edit. (Two edits made elsewhere one after the other, on top
    of this one, look the same: that edit is kept too, which costs room, not content.)"""
    c = step.conflict
    if c is not None:
        return c.copy is None and c.winner is Side.REMOTE
    old = step.expected
    if old is None or old.deleted or old.kind is not Kind.FILE or old.modified_by != me:
        return False
    unseen = sum(max(0, n - old.version.get(r)) for r, n in step.record.version)
    return unseen >= 2 and not old.same_content(step.record)


def _unnamed_budget() -> int:
    """How many unnamed temp files may be open at once: two whole batches, once the soft limit
    on open files is raised (toward the hard limit) to allow it, else what the limit leaves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_UNNAMED + FDS_SPARE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return MAX_UNNAMED
    return max(0, min(MAX_UNNAMED, soft - FDS_SPARE))


class Applier:
    def __init__(
        self,
        store: Store,
        root: Path,
        fetch: Fetch,
        *,
        via: str = "",
        replan: Callable[[Step], list[Step]] | None = None,
        keep_steps: bool = False,
        on_progress: Callable[[ApplyStats], None] | None = None,
        check_root: Callable[[], None] | None = None,
        source_root: str | None = None,
        keeper: Keeper | None = None,
        source_keeper: Keeper | None = None,
    ):
        self.store = store
        # Keeps what a removal or a rewrite takes out of the tree, as the config says (versions).
        self._keeper = keeper
        # The source's, when it is a replica on this machine (a one-shot sync): an edit there
        # that loses a conflict here with no copy is kept there, before the other pass of the
        # sync writes over it (its daemon, were it the one applying, would keep it itself).
        self._source_keeper = source_keeper
        # Raises RootChanged if the root is no longer the replica's own directory: asked before
        # each batch is installed and before each removal, so that a disk unmounted (or a root
        # moved aside) in the middle of an apply stops it, rather than fill the stranger.
        self._check_root = check_root or (lambda: None)
        self.root = root
        self._root = str(root)
        self._mounts: Mounts | None = None  # the tree's mount points (see mounts.py), once read
        self._dirs_ok: set[str] = set()  # parents checked to be real directories, this batch
        self.fetch = fetch
        self.via = via
        self.replan = replan
        self.keep_steps = keep_steps
        self.on_progress = on_progress
        self.stats = ApplyStats()
        self._batch: list[_Pending] = []
        self._batch_bytes = 0
        self._batch_fds = 0
        self._max_fds = _unnamed_budget() // 2  # per batch: the one in flight holds as many
        # A full batch whose data is being made durable on another thread while the next one
        # is staged (the thread returns the files it could not flush): see _rotate.
        self._flight: tuple[list[_Pending], _Background[_Failed]] | None = None
        # Until the file system says otherwise (and not at all if no descriptor can be spared).
        # (Linking one takes /proc/self/fd, which a chroot may lack.)
        self._unnamed_ok = (
            hasattr(os, "O_TMPFILE") and self._max_fds > 0 and os.path.isdir("/proc/self/fd")
        )
        self._deferred: list[Step] = []
        # Removed from disk, tombstones not yet recorded: each removal is made durable (an fsync
        # of its directory, or one syncfs) before its tombstone is committed, or a crash could
        # bring the file back under a tombstone and the next scan would record it as new.
        self._removed: list[Step] = []
        # Directories made since the last batch was finished: their own entries must be durable
        # too before the records of what is in them are committed (a syncfs covers them; a
        # small batch fsyncs their parents).
        self._made_dirs: set[str] = set()
        # Read-only directories opened for this apply (path -> mode they had), and directories
        # found writable already (see _unlock).
        self._unlocked: dict[str, int] = {}
        self._writable: set[str] = set()
        self._removing = False  # removals (deferred steps) have begun: none is deferred any more
        # Steps whose parent was not a directory yet, tried again after the others (see
        # _wait_for_parent), and their paths.
        self._parent_wait: list[Step] = []
        self._waiting: set[str] = set()
        self._second_try = False
        # New files that the other side moved from a path where this replica has them too: set
        # aside until every removal of the apply is known (see _apply_moves), then renamed.
        self._moves: list[tuple[Step, Record]] = []
        self._moves_open = True
        self._moved: list[tuple[Step, Step, int]] = []  # (the new file, the removal, its inode)
        self._not_moved: list[Step] = []
        self._replanned: set[str] = set()  # paths _changed planned again (once each)
        # Which files programs here have open (see diskio.OpenFiles and _not_being_written):
        # looked at when first needed, again for each batch installed.
        self._open_files: OpenFiles | None = None
        # ``fetch`` reads the files of a replica on this machine, at this root: new files are
        # copied by a second process once a few have been (see _copy_elsewhere).
        self._source_root = source_root
        self._copier: CopyProcess | None = None
        self._unnamed_written = 0

    # -- entry point ----------------------------------------------------------------------------

    def apply(self, steps: Iterable[Step]) -> ApplyStats:
        try:
            for step in steps:
                self._take(step)
            self._flush()
            if self._parent_wait:
                waiting, self._parent_wait = self._parent_wait, []
                self._second_try = True
                for step in waiting:
                    self._take(step)
                self._flush()
            self._apply_moves()
            self._removing = True
            for step in sorted(self._deferred, key=lambda s: s.path, reverse=True):
                self._guarded(step, self._apply_deferred)
                if len(self._removed) >= BATCH_FILES:
                    self._record_removals()
            self._record_removals()
            self._flush()
        finally:
            self._discard_batches()
            if self._copier is not None:
                self._copier.close()
                self._copier = None
            self._record_moves_anyway()
            self._record_removals_anyway()
            self._lock_again()
        return self.stats

    # -- read-only directories ------------------------------------------------------------------

    def _unlock(self, d: str) -> None:
        """Let this apply write in directory ``d`` when its mode does not (a read-only tree:
        Go's module cache, an archive unpacked read-only): a user's own directory is given
        owner write and search permission until the apply ends (``_lock_again``). Root needs
        none of it; a directory of someone else's is left to fail as it would."""
        if d in self._unlocked or d in self._writable:
            return
        p = self._p(d)
        try:
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode):
                return
            if os.access(p, os.W_OK | os.X_OK, effective_ids=True):
                self._writable.add(d)
                return
            if st.st_uid != os.geteuid():
                return
            os.chmod(p, stat.S_IMODE(st.st_mode) | stat.S_IWUSR | stat.S_IXUSR)
        except OSError:
            return
        self._unlocked[d] = stat.S_IMODE(st.st_mode)

    def _mode_set(self, d: str) -> None:
        """The applier gave ``d`` its recorded mode: whether it can write in it is to be seen
        again."""
        self._unlocked.pop(d, None)
        self._writable.discard(d)

    def _lock_again(self) -> None:
        """Give the directories ``_unlock`` opened their modes back: the recorded one (a page
        may have changed it), else the one they had. Deepest first: a parent made read-only
        again before its child would refuse the child's chmod nothing, but keep it tidy."""
        for d in sorted(self._unlocked, key=lambda x: x.count("/"), reverse=True):
            rec = self.store.get(d)
            mode = rec.mode if rec is not None and not rec.deleted and rec.kind is Kind.DIR \
                else self._unlocked[d]  # fmt: skip
            try:
                os.chmod(self._p(d), mode)
            except OSError:
                pass  # removed meanwhile
        self._unlocked.clear()
        self._writable.clear()

    def _take(self, step: Step) -> None:
        if step.deferred:
            self._deferred.append(step)
            return
        self._guarded(step, self._stage)
        if (
            len(self._batch) >= BATCH_FILES
            or self._batch_bytes >= BATCH_BYTES
            or self._batch_fds >= self._max_fds
        ):
            self._rotate()

    def _guarded(self, step: Step, fn: Callable[[Step], None]) -> None:
        try:
            if self._mounts is None:
                self._mounts = Mounts(self.store, self._root)
            if self._mounts.known and (held := self._mounts.not_mounted_above(step.path)):
                raise ReplError(not_mounted_message(held))
            self._unlock(parent_of(step.path))
            if step.source:
                self._unlock(parent_of(step.source))
            fn(step)
        except (ApplyStopped, StoreError):
            raise  # not this path's trouble (a full disk under the database): the apply stops
        except ParentNotDir as e:
            if self._removing or self._second_try:
                self._changed(step, e)
            else:
                self._wait_for_parent(step)
        except ChangedOnDisk as e:
            self._changed(step, e)
        except ReplError as e:
            self._error(step.path, str(e))
        except OSError as e:
            self._error(step.path, str(FsError(step.path, e)))
        except ValueError as e:
            # (What the system refuses outright, such as a NUL in a symlink's target from a
            # peer's record: that path fails, the daemon goes on.)
            self._error(step.path, f"cannot be applied: {e}")

    def _wait_for_parent(self, step: Step) -> None:
        """Try ``step`` again once every other step is staged: a later one may turn the file in
        the way into the directory it needs (a file replaced by a directory elsewhere, whose
        records arrive children first when the parent was recorded again last)."""
        self._parent_wait.append(step)
        self._waiting.add(step.path)

    def _changed(self, step: Step, e: ChangedOnDisk) -> None:
        log.info("%s", e)
        if self.replan is None:
            self._error(step.path, str(e))
            return
        if step.path in self._replanned:
            # Planned again once in this apply, and changed under it again: the next apply
            # tries again (each try here flushes, and would come back here: no end).
            self._error(step.path, self._still_changed(step.path, e))
            return
        self._replanned.add(step.path)
        self._flush()
        again_steps = self.replan(step)
        if not again_steps and step.source:
            # A conflict copy with nothing planned again (its path holds something new, and the
            # source's record is of another path): it is not written, and the step that settles
            # its conflict must not go ahead (see _stage).
            self._error(step.path, f"{e}; it will be synced next time")
        for again in again_steps:
            if again.deferred and not self._removing:
                self._deferred.append(again)
                continue
            try:
                (self._apply_deferred if again.deferred else self._stage)(again)
            except (ApplyStopped, StoreError):
                raise
            except ChangedOnDisk as e2:
                self._error(again.path, self._still_changed(again.path, e2))
            except (ReplError, OSError) as e2:
                self._error(again.path, str(e2))
        self._flush()

    def _still_changed(self, path: str, e: ChangedOnDisk) -> str:
        """Why a path that changed on disk is still not synced after a rescan: mostly a change
        in the middle of the sync, but a file this replica's user cannot read cannot be scanned
        (its change is never recorded), and the message must say so."""
        full = self._p(path)  # (no check of its parents: they may be anything now)
        try:
            st = os.lstat(full)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and not os.access(full, os.R_OK):
            return (f"{path}: cannot be read here (permission denied), so what changed in it "
                    "cannot be recorded, and it is not replaced: make it readable by this "
                    "replica's user (chmod u+r) and it syncs")  # fmt: skip
        return f"{e}; it will be synced next time"

    def _error(self, path: str, message: str) -> None:
        # Errors travel as (path, why): a message that names its path already says it once.
        message = message.removeprefix(f"{path}: ")
        log.debug("%s: %s", path, message)  # the caller shows it (the command line, the daemon)
        self.stats.errors.append((path, message))

    # -- paths and checks -----------------------------------------------------------------------

    def _p(self, path: str) -> str:
        return f"{self._root}/{path}" if path else self._root

    def _abs(self, path: str) -> str:
        check_path(path)
        return self._parents_ok(path)

    def _parents_ok(self, path: str) -> str:
        """The absolute path of a checked ``path``, once no parent on the way is a symlink."""
        # No component on the way may be a symlink: writing through one could leave the root.
        parent = parent_of(path)
        if parent and parent not in self._dirs_ok:
            cur = ""
            for part in parent.split("/"):
                cur = f"{cur}/{part}" if cur else part
                if cur in self._dirs_ok:
                    continue
                try:
                    st = os.lstat(self._p(cur))
                except FileNotFoundError:
                    break
                if not stat.S_ISDIR(st.st_mode):
                    if (what := special_kind(st.st_mode)) is not None:
                        raise InTheWay(path, what, at=cur)  # no later step makes it a directory
                    raise ParentNotDir(path, f"{cur} is not a directory")
                self._dirs_ok.add(cur)
        return self._p(path)

    def _check(self, path: str, expected: Record | None) -> os.stat_result | None:
        """The disk must still be as ``expected`` says; returns the current lstat (or None)."""
        try:
            st = os.lstat(self._p(path))
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None and (what := special_kind(st.st_mode)) is not None:
            raise InTheWay(path, what)
        if expected is None or expected.deleted:
            if st is not None:
                raise ChangedOnDisk(path, "something new is there")
            return None
        if st is None:
            raise ChangedOnDisk(path, "it is gone")
        if expected.kind is Kind.DIR:
            if not stat.S_ISDIR(st.st_mode):
                raise ChangedOnDisk(path, "no longer a directory")
        elif expected.kind is Kind.SYMLINK:
            if not stat.S_ISLNK(st.st_mode) or os.readlink(self._p(path)) != expected.target:
                raise ChangedOnDisk(path, "symlink changed")
        else:
            if not stat.S_ISREG(st.st_mode):
                raise ChangedOnDisk(path, "no longer a regular file")
            now = (st.st_size, st.st_mtime_ns, mode_of(st.st_mode))
            was = (expected.size, expected.mtime_ns, expected.mode)
            if now != was or (expected.ino and expected.ino != st.st_ino):
                raise ChangedOnDisk(path, "modified")
            if st.st_ctime_ns > checked_at(expected):
                # Written since with its size and mtime kept, maybe: read again (the rescan
                # finds it unchanged, or records the edit, which then meets this one).
                raise ChangedOnDisk(path, "touched since it was last read")
        return st

    def _gone_here(self, path: str, expected: Record | None) -> bool:
        """Whether a file or symlink ``expected`` says is here is gone, deleted (or moved away)
        and not recorded yet: a newer version of it then simply comes back, as a modification
        beats a deletion, with no scan first. (Scanning it first would be no better: its
        parent may be gone too, with a whole tree under it that a scan of one path would
        find deleted, and the circuit breaker hold, at every try.)"""
        if expected is None or expected.deleted or expected.kind is Kind.DIR:
            return False
        return not os.path.lexists(self._p(path))

    def _ensure_parent(self, path: str) -> None:
        """Create missing parent directories, and record them as alive here.

        A parent created only to hold an incoming entry is not a change of its own, so it gets no
        new version: a version of its own would be an event nobody else knows, and would beat or
        be concurrent with a deletion made elsewhere, bringing a deleted directory back.
        - With no record here it is a placeholder with an empty version, which any real record
          of it wins over: whoever sent the entry holds the directory, so its record is on its way
          (later in the same pass) or is outside a subtree sync and comes with the next full one.
        - Over a tombstone (or a record of another kind) it keeps that record's version, alive.
          The entry is then new to the deleter (had the deleter known it, the entry's own
          tombstone would be here already: a stream brings children's tombstones before their
          parent's, and it would have won over the entry), so the directory must live on. A
          replica that holds the tombstone takes the same version, alive, as a modification that
          beats the deletion (see reconcile); any later change, a deletion by someone who knows
          all this included, dominates it.
        """
        parent = parent_of(path)
        if not parent or parent in self._dirs_ok:
            return
        # Every directory on the way must be one, not a symlink to one (installed since the
        # path was staged: a peer's symlink, then a file "under" it): the lstats below stop at
        # the first that exists, which a symlink higher up would be followed to.
        self._parents_ok(path)
        missing = []
        p = parent
        while p:
            try:
                st = os.lstat(self._p(p))
            except FileNotFoundError:
                missing.append(p)
                p = parent_of(p)
                continue
            if not stat.S_ISDIR(st.st_mode):
                if (what := special_kind(st.st_mode)) is not None:
                    raise InTheWay(path, what, at=p)
                raise ChangedOnDisk(path, f"parent {p} is not a directory")
            break
        for d in reversed(missing):
            self._abs(d)
            self._unlock(parent_of(d))
            rec = self.store.get(d)
            # (Mode 0, a directory chmodded 000, is a mode like any other.)
            mode = 0o755
            if rec is not None and rec.kind is Kind.DIR and not rec.deleted:
                mode = rec.mode
            os.mkdir(self._p(d), mode)
            os.chmod(self._p(d), mode)
            self._mode_set(d)
            self._made_dirs.add(d)
            if rec is None:
                placeholder = Record(d, derived_guid("parent", d), Kind.DIR, VersionVector(),
                                     mode=mode)  # fmt: skip
                with self.store.transaction():
                    self._record(placeholder, local=True, action=Action.CREATE)
            elif rec.deleted or rec.kind is not Kind.DIR:
                alive = Record(d, rec.guid, Kind.DIR, rec.version, mode=mode)
                with self.store.transaction():
                    self._record(alive, local=True, action=Action.CREATE)

    # -- staging (everything but removals) ------------------------------------------------------

    def _stage(self, step: Step) -> None:
        rec = step.record
        path = step.path
        copy = step.conflict.copy if step.conflict is not None else None
        if copy is not None and copy.path in self._waiting and not self._second_try:
            self._wait_for_parent(step)  # after its copy, which waits for its directory
            return
        if copy is not None:
            # The losing version's copy first, for good: the step that settles the conflict
            # may replace the file it was taken from, or record the loser as seen.
            self._flush()
            why = next((m for p, m in reversed(self.stats.errors) if p == copy.path), None)
            if why is not None:
                raise ReplError(
                    f"left as it is: its conflict copy {copy.path} could not be written ({why})"
                )
        if step.op is Op.RECORD:
            self._batch.append(_Pending(step))
            return
        self._abs(path)
        if step.op is Op.WRITE:
            if self._gone_here(path, step.expected):
                step = dataclasses.replace(step, expected=None)  # a new file here, then
            new = step.expected is None or step.expected.deleted
            others = self.store.live_with_hash(rec.sha256)  # the content here already, if at all
            if new and self._may_move(step, others):
                return  # set aside: renamed (or written) once the removals are known
            if not new:
                # A new file needs no look first: it is linked to its name at install, which
                # fails if anything is there by then (and so if it was there already).
                self._check(path, step.expected)
            self._ensure_parent(path)
            if new and not others and self._copy_elsewhere(step):
                return
            pending = self._write_content(step, new, others)
            self._batch.append(pending)
            self._batch_fds += pending.fd is not None
            self._batch_bytes += rec.size
        elif step.op is Op.MKDIR:
            st = self._check(path, step.expected)
            self._ensure_parent(path)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                if self._keeper is not None:
                    self._keeper.removing(path, st)
                os.unlink(self._p(path))  # a file or symlink replaced by a directory
            os.mkdir(self._p(path), rec.mode)
            os.chmod(self._p(path), rec.mode)
            self._mode_set(path)
            self._made_dirs.add(path)
            self._batch.append(_Pending(step))
        elif step.op is Op.SYMLINK:
            self._check(path, step.expected)
            self._ensure_parent(path)
            tmp = self._temp_name(path)
            os.symlink(rec.target, tmp)
            if rec.mtime_ns:
                os.utime(tmp, ns=(rec.mtime_ns, rec.mtime_ns), follow_symlinks=False)
            self._batch.append(_Pending(step, tmp))
        elif step.op is Op.META:
            self._check(path, step.expected)
            os.chmod(self._p(path), rec.mode)
            self._mode_set(path)
            if rec.kind is Kind.FILE:
                os.utime(self._p(path), ns=(rec.mtime_ns, rec.mtime_ns))
            self._batch.append(_Pending(step))
        else:
            raise AssertionError(f"not a staged op: {step.op}")

    def _write_content(self, step: Step, new: bool, others: list[Record]) -> _Pending:
        """The content of ``step``'s file in a temporary file beside it: read from a local file
        among ``others`` (live records with its hash) if one is intact, else fetched."""
        rec = step.record
        src, local = self._open_source(rec, step.source, others)
        try:
            if new and getattr(src, "spool", None) is None:  # a spool is adopted instead
                fd = self._write_unnamed(rec, src, local is not None)
                if fd is not None:
                    self._unnamed_written += 1
                    return _Pending(step, fd=fd)
            return _Pending(step, self._write_temp(rec, src, local is not None))
        except SourceChanged:
            if local is not None:
                self.store.set_ino(local, 0)  # a stat cache: the next scan reads it again
            else:
                self.stats.stale_sources.append(step.source or step.path)
            raise
        finally:
            src.close()  # consumed and closed already, unless something failed first

    def _copy_elsewhere(self, step: Step) -> bool:
        """Hand a new file's copy to the copy process (see copyproc) if the content comes from
        a replica on this machine, once this apply has written a few new files itself into
        unnamed temporary files (a small sync forks nothing; the file system has them)."""
        if self._source_root is None or not self._unnamed_ok:
            return False
        if self._copier is None:
            if self._unnamed_written < COPY_PROCESS_AFTER or self._flight is not None:
                return False  # (forked while no thread of ours runs: see copyproc)
            try:
                self._copier = CopyProcess()
            except OSError as e:
                log.info("%s: copying in this process (%s)", self.root, e)
                self._source_root = None
                return False
        rec = step.record
        source = os.fsencode(f"{self._source_root}/{step.source or rec.path}")
        job = self._copier.submit(source, os.fsencode(self._p(parent_of(rec.path))), rec.size,
                                  rec.sha256, rec.mode, rec.mtime_ns)  # fmt: skip
        self._batch.append(_Pending(step, job=job))
        self._batch_fds += 1
        self._batch_bytes += rec.size
        return True

    def _collect(self, batch: list[_Pending]) -> None:
        """The copy process's temporary files for ``batch``; a file it could not copy is copied
        here, which fails the usual way (the source changed since its scan: an error, and the
        source is read again next time) or not (a directory that takes no unnamed file)."""
        assert self._copier is not None
        for p in [p for p in batch if p.job is not None]:
            job, p.job = p.job, None
            p.fd = self._copier.take(job)
            if p.fd is not None:
                continue
            try:
                done = self._write_content(p.step, True, [])
                p.fd, p.tmp = done.fd, done.tmp
            except (ApplyStopped, StoreError):
                raise
            except ReplError as e:
                self._error(p.step.path, str(e))
                batch.remove(p)
            except OSError as e:
                self._error(p.step.path, str(FsError(p.step.path, e)))
                batch.remove(p)

    def _temp_name(self, path: str) -> Path:
        name = path.rpartition("/")[2]
        tag = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return Path(self._p(parent_of(path)) + f"/{TEMP_PREFIX}{tag}-{os.urandom(4).hex()}")

    def _write_temp(self, rec: Record, src: BinaryIO, local: bool) -> Path:
        tmp = self._temp_name(rec.path)
        spool = getattr(src, "spool", None)
        if spool is not None and _same_device(spool.parent, tmp.parent):
            return self._adopt_spool(rec, src, tmp)
        self._fill_named(tmp, rec, src)
        if local:
            self.stats.copied_locally += 1
            self.stats.copied_locally_bytes += rec.size
        return tmp

    def _write_unnamed(self, rec: Record, src: BinaryIO, local: bool) -> int | None:
        """A new file's content in an unnamed temporary file (O_TMPFILE) in its directory, or
        None (``src`` untouched) on a file system without them. Nothing else sees the file
        (the watcher hears of its chmod and utime under a name like ``#1234``, which it drops),
        no creation or write event comes until it is linked to its name, and nothing is left
        to clean up after a crash."""
        if not self._unnamed_ok:
            return None
        try:
            fd = os.open(self._p(parent_of(rec.path)), os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC,
                         0o600)  # fmt: skip
        except OSError as e:
            # (ENOENT is the directory gone meanwhile: this file's trouble, not the tree's.)
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                self._unnamed_ok = False
                log.info("%s: no unnamed temporary files here (%s)", self.root, e.strerror)
                return None
            raise
        try:
            self._fill(fd, rec, src, local)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fill(self, fd: int, rec: Record, src: BinaryIO, local: bool) -> None:
        """Write ``src`` to ``fd``, check it is ``rec``'s content, give it ``rec``'s metadata."""
        with src:
            sha, size = copy_hashed(src.read, fd, rec.size)
        _check_content(rec, sha, size)
        os.fchmod(fd, rec.mode)
        os.utime(fd, ns=(rec.mtime_ns, rec.mtime_ns))
        if local:
            self.stats.copied_locally += 1
            self.stats.copied_locally_bytes += rec.size

    def _adopt_spool(self, rec: Record, src: BinaryIO, tmp: Path) -> Path:
        """A big fetched file: the fetcher wrote every block to its spool (the resumable partial
        file, on this file system) as it read it, so that copy is checked and renamed to the temp
        name: the bytes are written once, not twice."""
        with src:
            size = 0
            while chunk := src.read(COPY_CHUNK):
                size += len(chunk)
            spool = src.take_spool()  # type: ignore[attr-defined]
        try:
            # Each block was checked against the record's block hash before it went into the
            # spool (or, resumed, when read back from it): a spool of the right size without
            # holes is the content the record describes, and a second SHA-256 pass over it would
            # only cost time. Anything less sure is hashed whole.
            if src.blocks_checked and _dense(spool, rec.size):  # type: ignore[attr-defined]
                sha = rec.sha256
            else:
                sha, _, size, _ = hash_file_stat(spool)
            _check_content(rec, sha, size)
        except BaseException:
            _unlink_quiet(spool)  # not the content it should be: nothing worth resuming
            raise
        os.chmod(spool, rec.mode)
        os.utime(spool, ns=(rec.mtime_ns, rec.mtime_ns))
        try:
            os.rename(spool, tmp)  # made durable with the batch, as any temp file
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise  # the spool stays: the next try resumes from it
            # Two mounts of one file system (a bind mount) share st_dev but refuse renames
            # between them: copy it over once, then let it go.
            with open(spool, "rb") as f:
                self._fill_named(tmp, rec, f)
            _unlink_quiet(spool)
        return tmp

    def _fill_named(self, tmp: Path, rec: Record, src: BinaryIO) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            self._fill(fd, rec, src, False)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        finally:
            os.close(fd)

    def _open_source(
        self, rec: Record, source: str, others: list[Record]
    ) -> tuple[BinaryIO, str | None]:
        """Content from one of ``others`` (live records with the same hash) if one is intact
        on disk (and its path), else from the fetcher (and None)."""
        for other in others:
            if other.kind is not Kind.FILE:
                continue
            try:
                f = open(open_regular(self._p(other.path)), "rb")
            except OSError:
                continue
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) == (other.size, other.mtime_ns):
                return f, other.path
            f.close()
        return self.fetch(rec.with_(path=source) if source else rec), None

    # -- moves ----------------------------------------------------------------------------------

    @staticmethod
    def planned_moves(store: Store, steps: list[Step]) -> list[Step]:
        """``steps`` as an apply would carry them out with respect to moves, for a dry run's
        list: a new file that is a file of this replica's moved elsewhere by the other side
        (see _may_move), whose old path the plan removes, is one "moved from OLD" step, not a
        write and a delete."""
        removed = {st.path: st for st in steps if st.op is Op.DELETE}
        if not removed:
            return steps
        gone: set[str] = set()
        out: list[Step] = []
        for st in steps:
            rec = st.record
            if (st.op is Op.WRITE and rec.kind is Kind.FILE and rec.sha256 and st.conflict is None
                    and not st.source and (st.expected is None or st.expected.deleted)):  # fmt: skip
                old = next((o for o in store.live_with_hash(rec.sha256)
                            if _moved_from(o, rec) and o.path in removed and o.path not in gone),
                           None)  # fmt: skip
                if old is not None:
                    gone.add(old.path)
                    st = dataclasses.replace(st, note=f"moved from {old.path}")
            out.append(st)
        return [st for st in out if not (st.op is Op.DELETE and st.path in gone)]

    def _may_move(self, step: Step, others: list[Record]) -> bool:
        """Set ``step`` aside if its new file is one the other side moved (its scan kept the
        file's guid) from a path where this replica has the very same file (among ``others``,
        the live records with its hash): if this apply also removes that path, the file is
        renamed, not copied (see _apply_moves)."""
        rec = step.record
        if not self._moves_open or step.conflict is not None or step.source or not rec.sha256:
            return False
        if len(others) >= HASH_MATCHES:  # (more files with this content than listed)
            others = self.store.live_with_hash(rec.sha256, guid=rec.guid)
        for other in others:
            if _moved_from(other, rec):
                self._moves.append((step, other))
                return True
        return False

    def _apply_moves(self) -> None:
        """The files set aside by _may_move, once every other new file is in place and every
        removal of the apply is known (a stream sends a move's new path and the removal of its
        old one in either order): one whose old path this apply removes, still as recorded, is
        renamed there (a big tree moved costs no copy, no time and no space), and the removal
        is recorded as done with it; the others are written as any new file."""
        moves, self._moves = self._moves, []
        self._moves_open = False
        if not moves:
            return
        removals = {
            s.path: s
            for s in self._deferred
            if s.op is Op.DELETE and s.conflict is None and s.expected is not None
        }
        for step, old in moves:
            gone = removals.pop(old.path, None)
            if gone is None or gone.expected is None or gone.expected.guid != step.record.guid:
                self._not_moved.append(step)
                continue
            self._guarded(step, lambda s, g=gone: self._move(s, g))  # type: ignore[misc]
        self._record_moves()
        rest, self._not_moved = self._not_moved, []
        for step in rest:
            self._take(step)
        self._flush()

    def _move(self, step: Step, gone: Step) -> None:
        """Rename the file at ``gone``'s path (a removal of this apply) to ``step``'s new one, if
        it is on disk as recorded; else (edited here meanwhile: its removal finds out and keeps
        it) ``step`` is written as any new file."""
        assert gone.expected is not None
        self._check_root()
        old = gone.path
        self._abs(old)
        try:
            self._check(old, gone.expected)
        except ChangedOnDisk:
            if not self._still_as_recorded(old, gone.expected):
                self._not_moved.append(step)
                return
        if gone.expected.sha256 != step.record.sha256:
            self._not_moved.append(step)
            return
        self._ensure_parent(step.path)
        self._unlock(parent_of(old))
        try:
            rename_noreplace(self._p(old), self._p(step.path))
        except FileExistsError:
            raise ChangedOnDisk(step.path, "something new is there") from None
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            self._not_moved.append(step)  # another mount inside the root, or no renameat2
            return
        ino = os.lstat(self._p(step.path)).st_ino
        note = f"moved from {old}"
        self._moved.append((Step(step.op, step.path, step.record, step.expected, note=note),
                            Step(gone.op, old, gone.record, gone.expected, deferred=True,
                                 note=f"moved to {step.path}"), ino))  # fmt: skip
        self._deferred = [s for s in self._deferred if s is not gone]

    def _still_as_recorded(self, path: str, expected: Record) -> bool:
        """Whether the file at ``path``, which its ctime says may have been written to since it
        was read (a file recorded a few milliseconds after it was written: the watcher's
        usual pace), holds ``expected``'s content still: read again."""
        try:
            sha, _, size, st = hash_file_stat(self._p(path))
        except OSError:
            return False
        now = (sha, size, st.st_mtime_ns, mode_of(st.st_mode))
        was = (expected.sha256, expected.size, expected.mtime_ns, expected.mode)
        return stat.S_ISREG(st.st_mode) and now == was and expected.ino in (0, st.st_ino)

    def _record_moves(self) -> None:
        """Make the renames durable (the old names gone, the new ones there), then record both
        ends of each in one transaction: the new path first, as the other side sent them."""
        moved, self._moved = self._moved, []
        if not moved:
            return
        made, self._made_dirs = self._made_dirs, set()
        dirs = {parent_of(p) for st, gone, _ in moved for p in (st.path, gone.path)}
        self._names_durable(dirs | {parent_of(d) for d in made})
        with self.store.transaction():
            for st, gone, ino in moved:
                self._record(st.record, local=False, step=st, ino=ino, moved=True)
                self._record(gone.record, local=False, step=gone, moved=True)
        if self.on_progress is not None:
            self.on_progress(self.stats)

    def _record_moves_anyway(self) -> None:
        """On the way out of ``apply`` after an error: files renamed and not yet recorded are
        recorded if at all possible (else the next scan finds them moved here)."""
        if not (n := len(self._moved)):
            return
        try:
            self._record_moves()
        except (OSError, ReplError, sqlite3.Error) as e:
            log.warning("%s: %d move(s) not recorded (%s); the next scan records them",
                        self.root, n, e)  # fmt: skip

    # -- the batch ------------------------------------------------------------------------------

    def _take_batch(self, collect: bool = True) -> list[_Pending]:
        batch, self._batch, self._batch_bytes, self._batch_fds = self._batch, [], 0, 0
        if collect and self._copier is not None:
            try:
                self._collect(batch)
            except BaseException:
                for p in batch:
                    self._drop_pending(p)
                raise
        return batch

    def _rotate(self) -> None:
        """A full batch: its data is made durable on another thread while the next batch is
        staged (the wait for the disk is most of a big batch's time, and for a few big files
        fetched from a peer, the transfer would stop meanwhile); the batch is installed and
        recorded when the next one is full, or at the next flush."""
        self._finish_flight()
        batch = self._take_batch()
        files = _files(batch)
        self._flight = (batch, _Background(lambda: self._make_durable(files)))

    def _make_durable(self, files: list[_Pending]) -> _Failed:
        """Flush the temporary files' data; returns the ones that could not be. A few (a live
        edit, a few big files) are flushed one by one, which waits only for them; many are
        flushed with one syncfs, which also waits for whatever else is being written. No
        database and no counters: it runs on another thread."""
        if len(files) > SMALL_BATCH:
            syncfs(self.root)
            return []
        failed = []
        for p in files:
            try:
                _fdatasync(p.fd, p.tmp)
            except OSError as e:
                failed.append((p, e))
        return failed

    def _finish_flight(self) -> None:
        if self._flight is not None:
            batch, data_synced = self._flight
            self._flight = None
            self._finish(batch, data_synced)

    def _flush(self) -> None:
        """Install and record everything staged so far."""
        self._finish_flight()
        if self._batch:
            self._finish(self._take_batch(), None)

    def _finish(self, batch: list[_Pending], data_synced: _Background[_Failed] | None) -> None:
        """Make a batch's temporary files durable (``data_synced``: the thread that does, begun
        already), give them their names, make the names durable, record them in one transaction.
        """
        self._dirs_ok.clear()
        files = _files(batch)
        # Durable before it gets its name, and the names durable before the records say so:
        # the names of a few files in a few directories by an fsync of each directory, else
        # by a syncfs.
        made, self._made_dirs = self._made_dirs, set()
        dirs = {parent_of(p.step.path) for p in files} | {parent_of(d) for d in made}
        small = len(files) <= SMALL_BATCH and len(dirs) <= SMALL_BATCH
        ready: list[tuple[_Pending, int]] = []
        changed: list[tuple[Step, ChangedOnDisk]] = []
        try:
            if data_synced is not None:
                failed = data_synced.wait()
            else:
                failed = self._make_durable(files)
            for p, e in failed:
                self._drop_pending(p)
                self._error(p.step.path, str(FsError(p.step.path, e)))
                batch.remove(p)
            self._check_root()  # before any name is given (the finally drops the batch)
            self._install_batch(batch, ready, changed)
        finally:
            for p in batch:  # left over only if installing stopped on an exception
                self._drop_pending(p)
        names_synced = None
        if files or made:
            if small:
                for d in dirs:
                    _fsync_dir(self._p(d))
            else:
                # On another thread while the records are written; committed once it is done.
                names_synced = _Background(lambda: syncfs(self.root))
        try:
            with self.store.transaction():
                record = self._record
                for p, ino in ready:
                    record(p.step.record, local=False, step=p.step, ino=ino)
                if names_synced is not None:
                    names_synced.wait()
        finally:
            if names_synced is not None:
                names_synced.join()
        if self.on_progress is not None:
            self.on_progress(self.stats)
        # Paths that changed under us are planned again once the rest of the batch is recorded.
        for step, why in changed:
            self._changed(step, why)

    def _install_batch(
        self,
        batch: list[_Pending],
        ready: list[tuple[_Pending, int]],
        changed: list[tuple[Step, ChangedOnDisk]],
    ) -> None:
        self._open_files = None  # what /proc said of an earlier batch is out of date
        for p in batch:
            ino = 0
            if p.fd is not None:
                try:
                    self._link_unnamed(p.fd, p.step)
                    ino = os.fstat(p.fd).st_ino
                except ChangedOnDisk as e:
                    changed.append((p.step, e))
                    continue
                except InTheWay as e:
                    self._error(p.step.path, str(e))
                    continue
                except OSError as e:
                    self._error(p.step.path, str(FsError(p.step.path, e)))
                    continue
                finally:
                    os.close(p.fd)
                    p.fd = None
            elif p.tmp is not None:
                try:
                    self._install(p.tmp, p.step)
                    ino = os.lstat(self._p(p.step.path)).st_ino
                except ChangedOnDisk as e:
                    _unlink_quiet(p.tmp)
                    p.tmp = None
                    changed.append((p.step, e))
                    continue
                except OSError as e:
                    _unlink_quiet(p.tmp)
                    self._error(p.step.path, str(FsError(p.step.path, e)))
                    continue
                except (InTheWay, InUse, VersionError) as e:
                    _unlink_quiet(p.tmp)
                    self._error(p.step.path, str(e))
                    continue
                p.tmp = None
            elif p.step.op in (Op.MKDIR, Op.META) or p.step.record.kind is Kind.FILE:
                try:
                    ino = os.lstat(self._p(p.step.path)).st_ino
                except OSError:
                    ino = 0
            ready.append((p, ino))

    def _link_unnamed(self, fd: int, step: Step) -> None:
        """Give an unnamed temporary file its name; fails if anything appeared there since."""
        self._parents_ok(step.path)  # again: a parent may have become a symlink since staging
        # The link itself fails if anything is at the name: no look before it.
        # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N links the open file (open(2) documents
        # this for O_TMPFILE). os.link calls plain link(), which does not follow, unless a
        # dir_fd is given; linkat ignores it for an absolute source, so any descriptor will do.
        try:
            os.link(f"/proc/self/fd/{fd}", self._p(step.path), src_dir_fd=fd,
                    follow_symlinks=True)  # fmt: skip
        except FileExistsError:
            self._check(step.path, None)  # says what is there: something new, or in the way
            raise ChangedOnDisk(step.path, "something new is there") from None  # (gone since)

    def _install(self, tmp: Path, step: Step) -> None:
        """Put the temp file in place. A file new here is linked to its name, which fails if
        anything is there: nothing is replaced that was not planned for."""
        target = self._parents_ok(step.path)  # again: a parent may have become a symlink
        # Whatever was there is no directory any more: nothing under it is one, as far as
        # the checks of this batch go.
        if step.path in self._dirs_ok:
            gone = step.path + "/"
            self._dirs_ok = {d for d in self._dirs_ok if d != step.path and not d.startswith(gone)}
        if step.expected is not None and not step.expected.deleted:
            st = self._check(step.path, step.expected)
            self._not_being_written(step.path, st, "replaced by the new version")
            if self._keeper is not None:
                self._keeper.replacing(step.path, step.record.kind is Kind.FILE,
                                       lost_edit=_drops_local_edit(step, self.store.replica_id))
            os.rename(tmp, target)
            return
        try:
            os.link(tmp, target, follow_symlinks=False)
        except FileExistsError:
            self._check(step.path, None)  # says what is there: something new, or in the way
            raise ChangedOnDisk(step.path, "something new is there") from None  # (gone since)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # A file system without hard links: look, then rename (a rename replaces).
            self._check(step.path, step.expected)
            if self._keeper is not None:
                self._keeper.replacing(step.path, step.record.kind is Kind.FILE,
                                       lost_edit=_drops_local_edit(step, self.store.replica_id))
            os.rename(tmp, target)
            return
        os.unlink(tmp)

    def _not_being_written(self, path: str, st: os.stat_result | None, what: str) -> None:
        """Raise InUse if a program here has ``path`` (``st``: its lstat) open for writing:
        asked of the kernel (a lease), and of /proc (OpenFiles: which program, or whether at all
        when the kernel cannot say), looked through at most once a batch."""
        if st is None or not stat.S_ISREG(st.st_mode):
            return
        kernel = written_elsewhere(self._p(path))
        if kernel is False:
            return
        if self._open_files is None:
            self._open_files = OpenFiles()
        writer = self._open_files.writer(st)
        if writer is None and kernel:
            writer = "a program (not one of this user's)"
        if writer is not None:
            raise InUse(path, writer, what)

    def _discard_batches(self) -> None:
        """Let go of what was staged and not installed (after an exception)."""
        if self._flight is not None:
            batch, data_synced = self._flight
            self._flight = None
            data_synced.join()
            for p in batch:
                self._drop_pending(p)
        for p in self._take_batch(collect=False):
            self._drop_pending(p)  # (the copy process's descriptors go with it: see apply)

    @staticmethod
    def _drop_pending(p: _Pending) -> None:
        """Let go of a temporary file that will not be installed."""
        if p.tmp is not None:
            _unlink_quiet(p.tmp)
            p.tmp = None
        if p.fd is not None:
            os.close(p.fd)  # an unnamed file: gone with its last descriptor
            p.fd = None

    def _record(
        self,
        rec: Record,
        *,
        local: bool,
        step: Step | None = None,
        action: Action | None = None,
        ino: int | None = None,
        moved: bool = False,
    ) -> None:
        """Store ``rec`` (with ``action``, and ``ino`` as its inode) in the caller's transaction;
        count ``step`` done (``moved``: one end of a file renamed by _apply_moves)."""
        if action is not None:
            rec = rec.with_(action=action)
        if step is None:
            self.store.put(rec, local=local, via=self.via, ino=ino)
            return
        note = step.note
        if step.conflict is not None:
            c = step.conflict
            note = f"conflict resolved: {c.winner.value} wins ({c.reason})"
            self.stats.conflicts += 1
            if c.copy is None and c.winner is Side.LOCAL and self._source_keeper is not None:
                try:
                    self._source_keeper.replacing(step.path, True, lost_edit=True)
                except VersionError as e:
                    log.warning("%s: the losing edit on the other replica is not kept: %s",
                                step.path, e)  # fmt: skip
        # (A file this apply wrote, renamed or chmod'ed: its status changed by this replica's
        # own hand, which is what the record's time then covers: see store.checked_at.)
        wrote = moved or step.op in (Op.WRITE, Op.SYMLINK, Op.META)
        self.store.put(rec, local=local, via=self.via, note=note, ino=ino, written=wrote)
        if moved:
            self.stats.moved += step.op is Op.WRITE
        elif step.op is Op.WRITE:
            self.stats.written += 1
            self.stats.written_bytes += rec.size
        elif step.op is Op.DELETE:
            self.stats.deleted += 1
        else:
            self.stats.recorded += 1
        self.stats.done_paths.add(step.path)
        if self.keep_steps:
            self.stats.done.append(step)

    # -- removals -------------------------------------------------------------------------------

    def _apply_deferred(self, step: Step) -> None:
        self._check_root()
        path = step.path
        copy = step.conflict.copy if step.conflict is not None else None
        if copy is not None:
            # A removal that settles a conflict (what a joining replica had, against a deletion)
            # goes only once its copy is safe, as in _stage.
            # (Removals run after the second try of steps that waited for their directory: a
            # copy that failed there is in the errors too.)
            why = next((m for p, m in reversed(self.stats.errors) if p == copy.path), None)
            if why is not None:
                raise ReplError(f"left as it is: its conflict copy {copy.path} could not be "
                                f"written ({why})")  # fmt: skip
        self._abs(path)
        expected = step.expected
        if step.op is Op.DELETE and not os.path.lexists(self._p(path)):
            # Gone here already, not recorded yet (a deletion the circuit breaker holds, a
            # parent removed): what the step asks for is done, and its tombstone is recorded.
            # (Asked to scan it first, a scan that may not record deletions would leave it
            # "changed on disk" at every try.)
            self._removed.append(step)
            return
        st = self._check(path, expected)
        if step.op is not Op.DELETE:
            # A directory replaced by a file: its children's tombstones (removed just before,
            # children sort after their parent) go first, so every replica that relays them
            # streams them before the file's record, never after it.
            self._record_removals()
        if st is not None and stat.S_ISDIR(st.st_mode):
            try:
                os.rmdir(self._p(path))
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                below = f"{path}/"
                failed = [(p, why) for p, why in self.stats.errors if p.startswith(below)]
                if failed:
                    # Not files the deleter did not know: files whose removal failed here (the
                    # next try removes them, then the directory). Kept as new, the directory
                    # would come back on every replica.
                    raise ReplError(f"left as it is: {len(failed)} path(s) in it could not be "
                                    f"removed (the first: {failed[0][0]}: {failed[0][1]})"
                                    ) from None  # fmt: skip
                self._keep_dir(step, st)
                return
        elif st is not None:
            self._not_being_written(path, st, "removed")
            if self._keeper is not None:
                self._keeper.removing(path, st)
            os.unlink(self._p(path))
        if step.op is Op.DELETE:
            self._removed.append(step)
            return
        # A directory replaced by a file or symlink: now that it is gone, stage the new thing.
        self._stage(Step(step.op, path, step.record, None, step.conflict, False, step.note))
        self._flush()

    def _record_removals(self) -> None:
        """Make the removals so far durable, then record their tombstones in one transaction.
        On an error they stay pending (and ``apply`` tries once more on its way out)."""
        steps = self._removed
        if not steps:
            return
        self._names_durable({parent_of(s.path) for s in steps})
        with self.store.transaction():
            for s in steps:
                self._record(s.record, local=False, step=s)
        self._removed = []

    def _names_durable(self, dirs: set[str]) -> None:
        """Make the entries of ``dirs`` durable: an fsync of each of a few (one removed since
        is skipped: its parent is in the set too), else one syncfs."""
        if len(dirs) <= SMALL_BATCH:
            for d in dirs:
                _fsync_dir(self._p(d))
        else:
            syncfs(self.root)

    def _record_removals_anyway(self) -> None:
        """On the way out of ``apply`` after an error: the files are gone from disk, so record
        their tombstones if at all possible (else the next scan records them as removed here)."""
        if not self._removed:
            return
        try:
            self._record_removals()
        except (OSError, ReplError, sqlite3.Error) as e:
            log.warning("%s: %d removal(s) not recorded (%s); the next scan records them",
                        self.root, len(self._removed), e)  # fmt: skip
            self._removed = []

    def _keep_dir(self, step: Step, st: os.stat_result) -> None:
        """The deleter did not know everything in this directory: keep it, alive and newer.

        If a file or symlink was to replace it, that one loses to the directory (as in a conflict,
        a directory wins: it holds files) and is kept beside it as a conflict copy first; the
        directory's new version, which dominates the file's, is recorded only once the copy is
        safe, or else every replica would delete the file for the directory.
        """
        assert step.expected is not None
        self._record_removals()  # its children's tombstones first, as for a replacement
        version = step.record.version.merge(step.expected.version).bump(self.store.replica_id)
        alive = step.expected.with_(version=version, mode=mode_of(st.st_mode))
        if step.op is not Op.DELETE:
            self._keep_replacement(step, alive)
        with self.store.transaction():
            self._record(alive, local=True, action=Action.UPDATE)
        self.stats.kept_dirs += 1
        log.info("%s: kept, it still holds files the deleting replica did not know", step.path)

    def _keep_replacement(self, step: Step, kept: Record) -> None:
        """Write the file or symlink that was to replace a kept directory as its conflict copy."""
        copy = conflict_copy_record(step.record, step.path)
        existing = self.store.get(copy.path)
        if existing is not None and existing.version.compare(copy.version) is not Order.DOMINATED:
            return  # this replica has that copy already (or a later state of it)
        reason = f"a directory that holds files beats a {step.record.kind.value}"
        conflict = Conflict(step.path, Side.LOCAL, kept, step.record, copy, reason)
        op = Op.WRITE if copy.kind is Kind.FILE else Op.SYMLINK
        note = f"conflict copy of {step.path}"
        try:
            self._stage(Step(op, copy.path, copy, existing, conflict, note=note, source=step.path))
            self._flush()
        except ChangedOnDisk as e:
            raise ReplError(f"{copy.path}: {e}") from None
        done = self.store.get(copy.path)
        if done is None or done.version != copy.version or done.deleted:
            raise ReplError(
                f"{step.path}: the directory is kept, but the {copy.kind.value} that was to "
                f"replace it could not be kept as {copy.path}; the next sync tries again"
            )


class SourceChanged(ReplError):
    """What was read for a file is not the content its record names: the file read changed
    since its last scan, maybe keeping its size and mtime (which a scan alone cannot see)."""


def _check_content(rec: Record, sha256: str, size: int) -> None:
    if sha256 != rec.sha256 or size != rec.size:
        raise SourceChanged(
            f"{rec.path}: content does not match its record: the file it was read from changed "
            "since it was scanned; it is read again at the next scan, and the next sync takes it"
        )


def _fdatasync(fd: int | None, path: Path | None) -> None:
    """Flush one temporary file's data: the open unnamed one, or the named one (or symlink,
    whose creation the directory's fsync covers)."""
    if fd is not None:
        os.fdatasync(fd)
        return
    assert path is not None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return  # a symlink: nothing but its directory entry
        raise
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # removed since: nothing of ours is in it any more
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dense(path: Path, size: int) -> bool:
    """``path`` is ``size`` bytes long and every byte of it was written (no hole)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_size == size and os.lseek(fd, 0, os.SEEK_HOLE) >= size
    except OSError:
        return False
    finally:
        os.close(fd)


def _same_device(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
