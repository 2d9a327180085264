"""The watcher: inotify events turned into hints of paths to scan.

Events are hints, never the truth: each one only names a path for the scanner to look at. The
watcher keeps one inotify watch per directory of the tree, ignored subtrees left out (a home
directory's caches would otherwise use up the kernel's watch limit for nothing). It sits on
watchdog's inotify layer (``InotifyFD``: the inotify descriptor, its reading thread and the
watch bookkeeping) and handles each event right on that thread: no event objects, queues and
dispatch threads in between, which cost more than the scan itself when thousands of files
arrive at once.

The paths are collected in a set; the daemon's loop is woken through a pipe and takes them after
a short quiet period (``Watcher.take``). Whatever the watcher cannot vouch for turns into a scan,
never into a missed change: a queue overflow asks for a full scan (and the watches are checked
again), and a directory that cannot be watched because the watch limit is reached is listed in
``unwatched``, which the daemon rescans every minute, and said once in the log with the fix.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.observers.inotify_c import InotifyConstants as IN
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

from ..protocol.record import is_temp_name

log = logging.getLogger(__name__)

WATCH_LIMIT_HELP = (
    "the inotify watch limit is reached (fs.inotify.max_user_watches = {limit}): {count} "
    "director{ies} of the tree could not be watched so far (the first: {first}; `repld status` "
    "counts them as they come); repld rescans them every {interval:g} s instead. To watch the whole tree, raise the limit: "
    "`echo fs.inotify.max_user_watches=524288 | sudo tee /etc/sysctl.d/40-repld.conf && "
    "sudo sysctl --system`, then `repld rescan` (or restart repld)"
)

# What can mean a change: creations, writes, metadata (chmod, chown, utime), deletions and both
# halves of a rename. Not opens and reads: every block served to a peer would cost events.
# IN_ONLYDIR: a directory replaced by something else since it was listed is not watched.
MASK = (
    IN.IN_CREATE
    | IN.IN_MODIFY
    | IN.IN_ATTRIB
    | IN.IN_CLOSE_WRITE
    | IN.IN_DELETE
    | IN.IN_MOVED_FROM
    | IN.IN_MOVED_TO
    | IN.IN_DELETE_SELF
    | IN.IN_DONT_FOLLOW
    | IN.IN_ONLYDIR
    | IN.IN_EXCL_UNLINK
)

# An event that ends an operation (a file closed after writing, a rename, a removal, a chmod):
# when the latest event is one of these, a much shorter quiet period is enough before scanning.
SETTLED = IN.IN_CLOSE_WRITE | IN.IN_MOVED_TO | IN.IN_MOVED_FROM | IN.IN_DELETE | IN.IN_ATTRIB
SETTLED_QUIET = 0.005  # seconds

Ignored = Callable[[str, bool], bool]  # (relative path, is a directory) -> not replicated


def watch_limit() -> str:
    try:
        return Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip()
    except OSError:
        return "unknown"


class Watcher:
    """Watches ``root`` recursively; ``wake`` is a file descriptor written once per burst."""

    def __init__(
        self,
        root: Path,
        wake_fd: int,
        *,
        exclude: tuple[Path, ...] = (),
        ignored: Ignored | None = None,
        rescan_every: float = 60.0,
    ):
        self.root = str(root)
        self._prefix = self.root.rstrip("/") + "/"
        self.wake_fd = wake_fd
        self.exclude = tuple(str(p).rstrip("/") + "/" for p in exclude)
        self.ignored: Ignored = ignored or (lambda path, is_dir: False)
        self.rescan_every = rescan_every  # how often the daemon scans ``unwatched`` (for the log)
        self._lock = threading.Lock()  # the pending paths
        self._paths: set[str] = set()
        self._full = False
        self._first = 0.0
        self._last = 0.0
        self._settled = False  # the latest event ended an operation (see SETTLED)
        self._wlock = threading.RLock()  # the watches
        self._fd: InotifyFD | None = None
        self._wd_path: dict[int, str] = {}  # watch descriptor -> directory ("" is the root)
        self._path_wd: dict[str, int] = {}
        self._id = id(self)
        self.unwatched: set[str] = set()  # subtrees without a watch (the watch limit)
        self._told_limit = False
        self.degraded = ""  # why watching is incomplete, for status and logs

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> bool:
        """Start watching; False (and ``degraded`` says why) if the root cannot be watched.
        Directories beyond the watch limit do not make it fail: see ``unwatched``."""
        try:
            self._fd = InotifyFD()
        except OSError as e:
            self.degraded = f"cannot use inotify: {e.strerror or e}"
            return False
        self._fd.start()
        with self._wlock:
            self._watch_tree("")
            watched = "" in self._path_wd
        if not watched:
            self.degraded = (
                "inotify watch limit reached"
                if "" in self.unwatched
                else f"cannot watch {self.root}"
            )
            self.stop()
            return False
        return True

    def stop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fd.stop()  # closes the descriptor, which ends its thread
            fd.join(timeout=5)

    @property
    def alive(self) -> bool:
        """False when the inotify thread is gone (stopped, or died on an error)."""
        return self._fd is not None and self._fd.is_alive()

    def refresh(self, ignored: Ignored | None = None) -> None:
        """Take new ignore rules, and try again to watch what could not be watched."""
        if ignored is not None:
            self.ignored = ignored
        with self._wlock:
            for path in [p for p in self._path_wd if p and self._ignored_dir(p)]:
                self._unwatch_tree(path)
            self.unwatched.clear()  # (the limit is told once per run, not once per retry)
            self._watch_tree("")

    # -- the watches ----------------------------------------------------------------------------

    def _excluded(self, rel: str) -> bool:
        return (self._prefix + rel + "/").startswith(self.exclude)

    def _ignored_dir(self, rel: str) -> bool:
        return self._excluded(rel) or self.ignored(rel, True)

    def _watch_tree(self, top: str, *, hint_found: bool = False) -> None:
        """Watch ``top`` and every directory below it that is not ignored; ``hint_found``: a
        directory just made, whose entries made before its watch had no event: each is a hint.

        (The hint of the directory alone is not enough: the daemon drops it as the echo of its
        own write when it made a directory of that mode at that path, and a program that
        removes a directory and makes it again at once, as git does, then lost its first
        files: a trial saw a file git checked out never recorded, every side "in sync".)"""
        fd = self._fd
        if fd is None:
            return
        told = self._told_limit
        stack = [top]
        while stack:
            rel = stack.pop()
            path = self._prefix + rel if rel else self.root
            # Watched already (seen twice: its own creation event after its parent's walk, or
            # a refresh): only what is below it may be new. A directory removed and made again
            # lost its old watch first (IN_IGNORED comes before the new IN_CREATE).
            if rel not in self._path_wd:
                try:
                    wd = fd.add_callback(os.fsencode(path), MASK, self, self._id)  # type: ignore[arg-type]
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        self._limit_reached(rel)
                    continue  # gone, not a directory any more, or unreadable: the scan says so
                if wd < 0:
                    continue  # EACCES, which watchdog does not raise
                old = self._wd_path.get(wd)
                if old is not None and old != rel:
                    self._path_wd.pop(old, None)  # the same directory, moved
                self._wd_path[wd] = rel
                self._path_wd[rel] = wd
            try:
                with os.scandir(path) as it:
                    for entry in it:
                        if is_temp_name(entry.name):
                            continue
                        try:
                            is_dir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            continue
                        if not is_dir and not hint_found:
                            continue
                        sub = f"{rel}/{entry.name}" if rel else entry.name
                        if hint_found and not self._excluded(sub):
                            self._hint(sub, settled=False)
                        if not is_dir:
                            continue
                        if not self._ignored_dir(sub):
                            stack.append(sub)
            except OSError:
                continue
        if self.unwatched and not told:
            self._tell_limit()  # once per run, when the walk is over: with the count

    def _unwatch_tree(self, top: str) -> None:
        prefix = top + "/"
        gone = [(p, wd) for p, wd in self._path_wd.items() if p == top or p.startswith(prefix)]
        for p, wd in gone:
            del self._path_wd[p]
            self._wd_path.pop(wd, None)
        self.unwatched = {u for u in self.unwatched if u != top and not u.startswith(prefix)}
        if self._fd is not None and gone:
            self._fd.remove_callbacks([(wd, self._id) for _, wd in gone])  # type: ignore[misc]

    def _limit_reached(self, rel: str) -> None:
        self.unwatched.add(rel)
        self.degraded = "inotify watch limit reached"

    def _tell_limit(self) -> None:
        self._told_limit = True
        count, first = len(self.unwatched), min(self.unwatched)
        log.warning(
            WATCH_LIMIT_HELP.format(
                limit=watch_limit(),
                count=count,
                ies="y" if count == 1 else "ies",
                first=first or ".",
                interval=self.rescan_every,
            )
        )

    def unwatched_now(self) -> list[str]:
        """The subtrees without a watch, copied: inotify's thread changes the set."""
        with self._wlock:
            return sorted(self.unwatched)

    # -- inotify's thread calls these (the WatchCallback protocol) ------------------------------

    def on_event(self, event: InotifyEvent) -> None:
        with self._wlock:
            top = self._wd_path.get(event.wd)
            if top is None:
                return
            if not event.name:
                # The directory itself (its metadata, its removal): the watch of its parent
                # reports the same change with the name, and the root's own is not replicated.
                # But a file system unmounted under it says so only here (and the scan of its
                # mount point finds the mount missing: see mounts.py).
                if not (event.mask & IN.IN_UNMOUNT and top):
                    return
                rel = top
        if not event.name:
            self._hint(rel, settled=True)
            return
        with self._wlock:
            name = os.fsdecode(event.name)
            if is_temp_name(name):
                return  # our own temporary files; their link or rename names the real path
            if name[0] == "#" and name[1:].isdigit() and not event.is_directory:
                # How inotify names an unnamed (O_TMPFILE) file, such as ours before it is
                # linked; a real file of that name is checked for.
                if not os.path.lexists(
                    f"{self._prefix}{top}/{name}" if top else self._prefix + name
                ):
                    return
            rel = f"{top}/{name}" if top else name
            if event.is_directory:
                if event.is_moved_from:
                    self._unwatch_tree(rel)
                elif (event.is_create or event.is_moved_to) and not self._ignored_dir(rel):
                    # Watched from now on; what it held already is found by scanning it. A watch
                    # remembered for that path belongs to a directory that was there before (its
                    # IN_IGNORED may come later, or never after an overflow): start afresh.
                    if rel in self._path_wd:
                        self._unwatch_tree(rel)
                    # (A directory moved in came with what it holds: its own hint covers it.)
                    self._watch_tree(rel, hint_found=event.is_create)
        if not self._excluded(rel):
            self._hint(rel, settled=bool(event.mask & SETTLED))

    def on_watch_deleted(self, wd: int) -> None:
        with self._wlock:
            path = self._wd_path.pop(wd, None)
            if path is not None and self._path_wd.get(path) == wd:
                del self._path_wd[path]

    def on_queue_overflow(self) -> None:
        log.warning("inotify queue overflow: events were lost; scanning the whole tree")
        self.request_full_scan()
        with self._wlock:
            # Events were lost, IN_IGNORED ones too: every watch is made again from the tree.
            if self._fd is not None and self._path_wd:
                self._fd.remove_callbacks([(wd, self._id) for wd in self._wd_path])  # type: ignore[misc]
            self._wd_path.clear()
            self._path_wd.clear()
            self.unwatched.clear()
            self._watch_tree("")

    # -- hints ----------------------------------------------------------------------------------

    def _hint(self, rel: str, *, settled: bool) -> None:
        """One path for the scanner; the daemon's loop is woken by the first of a burst."""
        now = time.monotonic()
        with self._lock:
            wake = not self._paths and not self._full
            if wake:
                self._first = now
            self._last = now
            self._settled = settled
            self._paths.add(rel)
        if wake:
            try:
                os.write(self.wake_fd, b"w")
            except OSError:
                pass

    def request_full_scan(self) -> None:
        with self._lock:
            self._full = True
            self._first = self._last = time.monotonic()
        try:
            os.write(self.wake_fd, b"w")
        except OSError:
            pass

    def due(self, quiet: float, longest: float) -> float | None:
        """Seconds until pending paths should be scanned (0: now); None if nothing is pending.
        ``quiet``: after the latest event, or only SETTLED_QUIET if that event ended an
        operation (a writer that closed its file is done; one that only wrote may go on)."""
        with self._lock:
            if not self._paths and not self._full:
                return None
            if self._settled:
                quiet = min(quiet, SETTLED_QUIET)
            now = time.monotonic()
            return max(0.0, min(self._last + quiet, self._first + longest) - now)

    def take(self) -> tuple[bool, list[str]]:
        """(full scan wanted, paths to scan), and forget them."""
        with self._lock:
            full, paths = self._full, sorted(self._paths)
            self._full = False
            self._paths = set()
        return full, paths
