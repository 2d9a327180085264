"""File systems mounted inside the tree, and what to do when one is not mounted any more.

A disk mounted at ``~/media`` (or a bind mount, an NFS share) is part of the tree while it is
mounted. Unmounted, its mount point is an empty directory of the file system around it, and a
scan would take every file that was on it for deleted, and send the deletions to every
replica: the same mistake as a root that is not mounted (see Replica.check_root), on part of
the tree. So the scanner notes the mount points it walks into (a directory on another device
than the root's) in the meta table (``mounts``), and while one of them is not mounted, nothing
under it is recorded as deleted (the scan leaves it alone, with an error saying why) and nothing
from a peer is written there (it would land on the file system beneath, hidden once the disk
is back). `repld scan --accept-deletes` forgets a mount point that is gone for good: what was
under it is then recorded as deleted.
"""

from __future__ import annotations

import json
import os
import stat

from .store import Store

MOUNTS = "mounts"  # meta key: the mount points found in the tree (JSON list of paths)


def is_mount_point(path: str) -> bool:
    """Whether ``path`` is a directory on another device than its parent's."""
    try:
        st = os.lstat(path)
        parent = os.lstat(os.path.dirname(path.rstrip("/")) or "/")
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_dev != parent.st_dev


def not_mounted_message(mount: str) -> str:
    return (f"a file system was mounted at {mount} and is not now: nothing under it is recorded "
            "as deleted, and nothing is written there, until it is mounted again (if it is gone "
            "for good, `repld scan --accept-deletes` records what was on it as deleted)")  # fmt: skip


class Mounts:
    """The mount points noted for a tree, and which of them are not mounted now (looked at
    once per instance: make one per scan or apply)."""

    def __init__(self, store: Store, root: str):
        self.root = root
        try:
            self.known: frozenset[str] = frozenset(json.loads(store.meta(MOUNTS) or "[]"))
        except (ValueError, TypeError):
            self.known = frozenset()
        self._missing: dict[str, bool] = {}

    def missing(self, mount: str) -> bool:
        """Whether the noted mount point ``mount`` has no file system mounted on it now."""
        if mount not in self._missing:
            self._missing[mount] = not is_mount_point(f"{self.root}/{mount}")
        return self._missing[mount]

    def not_mounted_above(self, path: str) -> str | None:
        """The noted mount point at or above ``path`` that is not mounted now, if any."""
        for m in self.known:
            if (path == m or path.startswith(m + "/")) and self.missing(m):
                return m
        return None


def note(store: Store, mounts: set[str]) -> None:
    """Write down the mount points of the tree (in the caller's transaction)."""
    store.set_meta(MOUNTS, json.dumps(sorted(mounts)))
