"""Versions: files that a change from another replica deleted or replaced here, kept for a while.

A deletion made on one machine reaches every other within a second; so does a save over the
wrong file. Before the applier removes a file for another replica's change (a deletion, a file
replaced by a directory or a symlink, or with ``keep_versions = "all"`` a newer version written
over it), it
links the file into ``STATE/versions/`` under its path in the tree, with the time in its name:
``Documents/report~20261122-150003.odt``. A hard link costs no copy and no space until the tree's
own name is gone (a state directory on another file system gets a copy instead). Changes made
on this machine are not versions: the file was this user's to change here.

Versions are never replicated (the state directory never is) and are deleted once they are
older than ``keep_versions_days``: by the daemon at its start and at each periodic scan, and by
the one-shot commands that apply changes. ``repld versions`` lists them; restoring one
(``restore``, ``repld versions PATH --restore``) is a copy back into the tree, which the next
scan records as any edit.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..protocol.errors import ReplError
from ..protocol.record import NAME_MAX, TEMP_PREFIX, Kind, Record

log = logging.getLogger(__name__)

STAMP = "%Y%m%d-%H%M%S"
# NAME~STAMP[-N]EXT, from the name NAME + EXT a file had in the tree.
# An extension is kept last (report~STAMP.odt opens as the .odt it is) only when it looks like
# one: a name such as settings.conf~20240101-120000 keeps its whole name before the stamp.
_EXT_RE = re.compile(r"^\.[A-Za-z0-9_+]{1,16}$")
_NAME_RE = re.compile(  # (DOTALL and \Z: a name may hold a newline, even end with one)
    r"(?P<stem>.+)~(?P<stamp>\d{8}-\d{6})(?:-(?P<n>\d+))?(?P<ext>\.[A-Za-z0-9_+]{1,16})?\Z",
    re.DOTALL,
)


class Keep(enum.Enum):
    OFF = "off"
    DELETED = "deleted"  # files another replica's change removed from the tree (the default)
    ALL = "all"  # those, and the old content of files another replica's change rewrote


class VersionError(ReplError):
    """A file's content could not be kept; ``full``: for want of room."""

    def __init__(self, message: str, *, full: bool = False):
        super().__init__(message)
        self.full = full


@dataclass(frozen=True)
class Version:
    path: str  # the path the file had in the tree
    kept: float  # when it was kept (local time, from its name), seconds since the epoch
    size: int
    file: Path  # where it is
    n: int = 0  # of the versions of one path kept in the same second, which (0 first)

    @property
    def order(self) -> tuple[float, int]:
        return self.kept, self.n


def version_name(name: str, when: float) -> str:
    """NAME~STAMP.EXT, within a file name's 255 bytes: a long name loses the end of its stem
    (room is left for a -N of several versions in one second)."""
    stem, ext = os.path.splitext(name)
    if not _EXT_RE.match(ext):
        stem, ext = name, ""
    tail = f"~{time.strftime(STAMP, time.localtime(when))}{ext}"
    room = NAME_MAX - 4 - len(tail.encode())
    if len(stem.encode()) > room:
        stem = stem.encode()[:room].decode("utf-8", "ignore")  # (no character cut in two)
    return stem + tail


class Keeper:
    """Keeps the files an apply removes or rewrites, as ``keep`` says, under ``where``."""

    def __init__(self, root: Path, where: Path, keep: Keep):
        self.root = str(root)
        self.where = where
        self.keep = keep

    def removing(self, path: str, st: os.stat_result) -> None:
        """``path`` (``st``: its lstat) is about to leave the tree: a file or a symlink is
        kept (a directory's files are kept one by one as they go). When the versions are on
        the same file system and it is full, it goes unkept, with a warning: a version there
        is a hard link, so not even that fits, and the deletion is what makes room; held back
        until there is room, it would be held for good (a full USB disk, a trial). (With the
        versions on another disk, a copy, the deletion waits for room there.)"""
        if self.keep is not Keep.OFF and (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            try:
                self._keep(path)
            except VersionError as e:
                if not e.full or _device_of(self.where) != st.st_dev:
                    raise
                log.warning("%s: deleted without a version kept: %s has no room for one",
                            path, self.where)  # fmt: skip

    def replacing(self, path: str, new_is_file: bool, *, lost_edit: bool = False) -> None:
        """What is at ``path`` is about to be replaced: by a file's new content (kept with
        "all"), or by a symlink (the file's content then leaves the tree: kept with "deleted"
        too, as `ln -sf` over a dotfile by a dotfile manager on another machine). An edit made
        here that loses a conflict with no conflict copy (``lost_edit``: --prefer, the newest
        policy) leaves the tree too: kept with "deleted"."""
        if self.keep is Keep.OFF or (new_is_file and self.keep is not Keep.ALL and not lost_edit):
            return
        try:
            st = os.lstat(os.path.join(self.root, path))
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode):
            self._keep(path)

    @staticmethod
    def _kept_already(source: str) -> bool:
        """Whether ``source`` was kept already by this process (the same inode: a version is a
        hard link): a one-shot sync keeps the loser of a conflict on the replica that made it
        when it decides, and would again when the winner is written there."""
        try:
            st = os.lstat(source)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) in _KEPT

    @staticmethod
    def _note_kept(target: Path) -> None:
        try:
            st = os.lstat(target)
        except OSError:
            return
        if len(_KEPT) >= 10_000:
            _KEPT.clear()
        _KEPT.add((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))

    def _keep(self, path: str) -> None:
        source = os.path.join(self.root, path)
        parent, _, name = path.rpartition("/")
        folder = self.where / parent if parent else self.where
        base = version_name(name, time.time())
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self._kept_already(source):
                return
            for n in range(1000):
                target = folder / (base if not n else _numbered(base, n))
                try:
                    os.link(source, target, follow_symlinks=False)
                    break
                except FileExistsError:
                    continue
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    if os.path.lexists(target):
                        continue
                    try:
                        shutil.copy2(source, target, follow_symlinks=False)  # another file system
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(target)  # no half copy passes for a version
                        raise
                    break
            else:
                raise OSError(errno.EEXIST, f"too many versions of it kept this second in {folder}")
            self._note_kept(Path(source))
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                # The versions directory adds its own path to the file's, past the 4096 bytes
                # of a path: it cannot be kept there, and refusing the change for that would
                # keep this replica apart from the others for good.
                log.warning("%s: its current content could not be kept in %s (the path would "
                            "be too long); the change goes ahead", path, self.where)  # fmt: skip
                return
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            if full:
                fix = "make room there"
            elif e.errno in (errno.ENOTDIR, errno.EEXIST) and not self.where.is_dir():
                fix = f"{self.where} must be a directory (something else is there)"
            else:
                fix = "check that this replica's user can write there"
            raise VersionError(
                f"its current content could not be kept in {self.where} before the change "
                f"({e.strerror or e}); left as it is: {fix}, or set keep_versions = \"off\" in "
                "the config",
                full=full,
            ) from None


def _device_of(path: Path) -> int:
    """The file system ``path`` is (or would be made) on: its nearest existing ancestor's."""
    for p in (path, *path.parents):
        try:
            return os.stat(p).st_dev
        except OSError:
            continue
    return -1


# Files this process has kept (device, inode, mtime, size): see Keeper._kept_already.
_KEPT: set[tuple[int, int, int, int]] = set()


def keeper_for(root: Path, where: Path, keep: Keep) -> Keeper | None:
    return None if keep is Keep.OFF else Keeper(root, where, keep)


def _numbered(base: str, n: int) -> str:
    m = _NAME_RE.match(base)
    assert m is not None
    return f"{m['stem']}~{m['stamp']}-{n}{m['ext'] or ''}"


def versions(where: Path, under: str = "") -> Iterator[Version]:
    """The versions kept in ``where`` of paths at or under ``under`` (every one for "")."""
    # A file's versions lie beside where it was, and a directory's files under it: the walk
    # starts at the parent of ``under``, and the paths found are filtered.
    top = (where / under).parent if under else where
    for dirpath, dirs, files in os.walk(top):
        rel_dir = os.path.relpath(dirpath, where)
        rel_dir = "" if rel_dir == "." else rel_dir
        # (A kept symlink to a directory is listed with the directories; it is not walked.)
        for f in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            m = _NAME_RE.match(f)
            if m is None:
                continue
            path = f"{rel_dir}/{m['stem']}{m['ext'] or ''}" if rel_dir else f"{m['stem']}{m['ext'] or ''}"
            if under and path != under and not path.startswith(under.rstrip("/") + "/"):
                continue
            try:
                kept = time.mktime(time.strptime(m["stamp"], STAMP))
                st = os.lstat(os.path.join(dirpath, f))
            except (ValueError, OSError):
                continue
            yield Version(path, kept, st.st_size, Path(dirpath) / f, int(m["n"] or 0))


RESTORE_GAP = 600.0  # s: versions kept further apart than this are of separate deletions


def newest_removal(kept: list[Version]) -> tuple[list[Version], list[Version]]:
    """For the restore of a directory: of each path's newest version, those kept by its newest
    removal (kept one after the other, no two more than RESTORE_GAP apart, back from the
    newest: an `rm -rf` that reached this replica in one go), and the others, of files removed
    before it (on purpose, as far as anyone can tell: they were not there to be removed)."""
    newest: dict[str, Version] = {}
    for v in kept:
        if v.path not in newest or v.order > newest[v.path].order:
            newest[v.path] = v
    times = sorted({v.kept for v in newest.values()}, reverse=True)
    cut = times[0] if times else 0.0
    for t in times[1:]:
        if cut - t > RESTORE_GAP:
            break
        cut = t
    recent = [v for v in newest.values() if v.kept >= cut]
    return recent, [v for v in newest.values() if v.kept < cut]


@dataclass
class Restored:
    """What ``restore`` did, path by path."""

    done: list[Version] = field(default_factory=list)
    older: list[Version] = field(default_factory=list)  # done, and older than the last deleted
    there: list[str] = field(default_factory=list)  # the same content is in the tree already
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def _content(where: str | Path) -> tuple[str, str] | None:
    """("file", SHA-256) or ("symlink", target) of what is at ``where``; None otherwise."""
    st = os.lstat(where)
    if stat.S_ISLNK(st.st_mode):
        return "symlink", os.readlink(where)
    if not stat.S_ISREG(st.st_mode):
        return None
    h = hashlib.sha256()
    with open(where, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "file", h.hexdigest()


def _recorded(rec: Record) -> tuple[str, str] | None:
    if rec.kind is Kind.FILE:
        return "file", rec.sha256
    if rec.kind is Kind.SYMLINK:
        return "symlink", rec.target
    return None


def restore(root: Path, kept: list[Version],
            recorded: Callable[[str], Record | None] = lambda path: None) -> Restored:  # fmt: skip
    """Copy the newest of ``kept`` for each path back to that path in the tree (content, mode
    and mtime; a copy, so that an edit of it leaves the version as it was), where nothing is
    now, and unless ``recorded`` (the replica's record of a path) says the tree has another
    version of it that is only missing from this disk: deleted here and not recorded yet (a
    mass deletion held back, or no scan since), and still on the peers. Put back, an older
    version would be an edit of that one, and replace it on every replica (a trial lost a
    file's content so, restoring a directory after an rm -rf the circuit breaker held)."""
    newest: dict[str, Version] = {}
    for v in kept:
        if v.path not in newest or v.order > newest[v.path].order:
            newest[v.path] = v
    out = Restored()
    for path in sorted(newest):
        v = newest[path]
        target = root / path
        try:
            if os.path.lexists(target):
                if _content(target) == _content(v.file):
                    out.there.append(path)
                    continue
                out.skipped.append((path, "something else is there now; copy the version "
                                          f"elsewhere if you want it: {v.file}"))  # fmt: skip
                continue
            rec = recorded(path)
            if rec is not None and not rec.deleted and _recorded(rec) != _content(v.file):
                out.skipped.append((path, (
                    "the tree has a newer version of it, which is only missing from this disk "
                    "(deleted here and not recorded yet: held back by the circuit breaker, or "
                    "no scan since); put back, this older one would replace it on every "
                    "replica. Copy it back from another replica's tree (`cp -an`: never over a "
                    f"file), or this version elsewhere: {v.file}")))  # fmt: skip
                continue
            _real_dirs(root, path)
            tmp = target.parent / f"{TEMP_PREFIX}restore-{os.urandom(4).hex()}"
            shutil.copy2(v.file, tmp, follow_symlinks=False)
            try:
                os.link(tmp, target, follow_symlinks=False)  # fails if anything came meanwhile
            finally:
                tmp.unlink()
        except FileExistsError:
            out.skipped.append((path, "something is there now"))
            continue
        except VersionError as e:
            out.skipped.append((path, str(e)))
            continue
        except OSError as e:
            out.skipped.append((path, e.strerror or str(e)))
            continue
        out.done.append(v)
        if rec is not None and rec.deleted and _recorded(rec) not in (None, _content(v.file)):
            out.older.append(v)
    return out


def _real_dirs(root: Path, path: str) -> None:
    """Make the directories above ``path`` in the tree; none of them may be a symlink (a restore
    must not write outside the tree)."""
    cur = root
    for part in path.split("/")[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise VersionError(f"{cur} is not a directory now")


def drop(where: Path, kept: list[Version]) -> tuple[int, int, list[tuple[Version, str]]]:
    """Delete these versions, and the folders of ``where`` that leaves empty: how many were
    deleted, the bytes that freed (a version still linked from the tree frees none), and the
    ones that could not be, with why."""
    gone = freed = 0
    errors: list[tuple[Version, str]] = []
    for v in kept:
        try:
            st = os.lstat(v.file)
            v.file.unlink()
        except OSError as e:
            errors.append((v, e.strerror or str(e)))
            continue
        gone += 1
        if st.st_nlink == 1:
            freed += st.st_blocks * 512
    for dirpath, _dirs, _files in os.walk(where, topdown=False):
        if dirpath != str(where):
            try:
                os.rmdir(dirpath)  # only if empty
            except OSError:
                pass
    return gone, freed, errors


def expire(where: Path, days: int, now: float | None = None) -> int:
    """Delete the versions older than ``days``, and the folders that leaves empty; how many."""
    if not where.is_dir():
        return 0
    limit = (time.time() if now is None else now) - days * 86400
    gone, _, errors = drop(where, [v for v in versions(where) if v.kept < limit])
    for v, why in errors:
        log.warning("%s: an old version could not be deleted (%s)", v.file, why)
    if gone:
        log.info("%d version(s) older than %d days deleted from %s", gone, days, where)
    return gone
