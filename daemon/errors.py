"""Errors of the part of repld that touches the world, below the one ``ReplError`` root."""

from __future__ import annotations

import errno as _errno
from pathlib import Path

from ..protocol.errors import ProtocolError, ReplError, UnsafePathError

__all__ = [
    "ReplError",
    "ProtocolError",
    "UnsafePathError",
    "ConfigError",
    "UsageError",
    "StoreError",
    "StoreBusy",
    "TreeMismatchError",
    "RolledBack",
    "RootChanged",
    "FsError",
    "ChangedOnDisk",
    "DaemonNotRunning",
]


class ConfigError(ReplError):
    """A configuration problem: names the file and, where it can, the line and key."""

    exit_code = 2

    def __init__(self, message: str, *, file: Path | str | None = None, key: str | None = None):
        where = str(file) if file is not None else ""
        if key:
            where = f"{where}: key {key!r}" if where else f"key {key!r}"
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.key = key


class UsageError(ReplError):
    exit_code = 2


class StoreError(ReplError):
    """The database is missing, locked, damaged or of the wrong kind."""


class DamagedDatabase(StoreError):
    """The database file is empty, damaged, or not a repld database: ``rejoin`` makes a new
    one (see the message). Exit status 2: trying again (a service restarted) changes nothing."""

    exit_code = 2

    def __init__(self, db_path: object, why: str):
        self.db_path = db_path
        super().__init__(
            f"{db_path}: the database is damaged ({why}). With the daemon stopped, `repld rejoin "
            "--tree-id TREE_ID` (the id from `repld id` on another replica) sets it aside and "
            "makes a new one: the files in the root are adopted and checked against the tree at "
            "the next sync, so nothing in the root is lost"
        )


class StoreBusy(StoreError):
    """Another repld process (the daemon, a sync, a scan) holds the database's write lock."""


class RolledBack(ReplError):
    """This replica's database is older than what a peer has seen of it (restored from a
    backup, copied from another machine): syncing on would reuse its version numbers."""

    def __init__(self, peer: str, seen: int, ours: int, config: Path | str):
        super().__init__(
            f"{peer} has seen this replica's records up to number {seen:,}, but its database "
            f"goes up to {ours:,} only: it was restored from an older backup, or copied from "
            f"another machine. Changes made here since would reuse version numbers that {peer} "
            "knows for other content (some would never reach it, some would be overwritten), "
            "so nothing is exchanged with any peer. Make this replica join its tree afresh: "
            f"`repld --config {config} rejoin` (with the daemon stopped) keeps the files, the "
            "config and the keys, and starts a new database whose every file is checked against "
            "the tree at the next sync: nothing here is lost. (If this replica's database was "
            f"not restored or copied, {peer} is wrong: `repld peer remove {peer}` and the "
            "daemon syncs with the others again.)"
        )


class ApplyStopped(ReplError):
    """Not one path's trouble: the whole apply stops there (what it did is recorded, the rest
    is tried again later)."""


# How status lists a path no sync can replicate (a FIFO, a name that is not UTF-8): a notice,
# not a failure; a sync does not fail for it.
NOT_REPLICATED = "not replicated: "


class ScanStopped(ReplError):
    """The daemon was asked to stop (SIGTERM) in the middle of a whole scan: nothing of it is
    recorded (a partial walk would take what it has not reached yet for deleted), and the next
    start scans again."""


class PeerLost(ApplyStopped):
    """The peer a page's content comes from went away, or stopped answering, in the middle of
    the page: failing each remaining file in turn, 30 s apiece, would only make noise."""


class RootChanged(ApplyStopped):
    """The root is missing, or is not the directory this replica was made on (an unmounted
    disk, a directory moved away and another made in its place): scanning it would record every
    file as deleted and send those deletions everywhere."""


class MassDelete(ReplError):
    """A scan found most of the tree gone at once (an `rm -rf` in the wrong place, a sync tool
    or a script run amok): not recorded, so not sent to any peer, until the user says so."""


class DeletesDeferred(ReplError):
    """A scan of a few paths found many of them deleted: not recorded yet, but left to a
    whole scan once the tree is quiet, which sees how much of the tree is gone (see Node)."""


class TreeMismatchError(ReplError):
    """Two replicas of different trees were asked to sync: a mistake in what was given (exit
    2, as for the same replica given twice)."""

    exit_code = 2


class DaemonNotRunning(ReplError):
    exit_code = 3


class FsError(ReplError):
    """A file system operation failed; keeps the errno and the path."""

    def __init__(self, path: str, err: OSError):
        self.path = path
        self.errno = err.errno
        reason = err.strerror or _errno.errorcode.get(err.errno or 0, str(err))
        super().__init__(f"{path}: {reason}")


class ChangedOnDisk(ReplError):
    """The local file changed since it was planned for; it must be rescanned, never overwritten."""

    def __init__(self, path: str, detail: str):
        self.path = path
        super().__init__(f"{path}: changed on disk since the last scan ({detail})")


class InTheWay(ReplError):
    """Something repld does not replicate (a FIFO, a socket, a device) is where a file goes:
    trying again changes nothing until the user moves it away."""

    def __init__(self, path: str, what: str, *, at: str = ""):
        self.path = path
        where = f"is at {at}, where a directory of its path goes," if at else "is there,"
        super().__init__(
            f"{path}: {what} {where} which repld does not replicate (nor replace): move it "
            "away, and the next sync puts what belongs there in its place"
        )


class InUse(ReplError):
    """The file a change from another replica would replace or remove is open for writing by
    a program here: done once it is closed (the next try), or its later writes would be lost."""

    def __init__(self, path: str, writer: str, what: str):
        self.path = path
        super().__init__(
            f"{path}: open for writing by {writer} here: {what} once it is closed (else "
            "what it writes next would be lost); the next try does it"
        )


class ParentNotDir(ChangedOnDisk):
    """A directory on the way to the path is something else on disk (perhaps only until a
    later step of the same apply makes it a directory: a file replaced by a directory)."""
