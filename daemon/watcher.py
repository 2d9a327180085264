"""The watcher: inotify events (through watchdog) turned into hints of paths to scan.

Events are hints, never the truth: each one only names a path for the scanner to look at. The
watcher thread collects paths in a set and wakes the daemon's loop through a pipe; the loop takes
them after a short quiet period (``Watcher.take``). Whatever the watcher cannot vouch for (a queue
overflow, a watch that could not be added) turns into a request for a full scan, never into a
missed change.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ..protocol.record import TEMP_PREFIX

log = logging.getLogger(__name__)

WATCH_LIMIT_HELP = (
    "the inotify watch limit is reached (fs.inotify.max_user_watches = {limit}); repld falls back "
    "to a full scan every {interval:g} s. To watch the whole tree, raise the limit: "
    "`echo fs.inotify.max_user_watches=524288 | sudo tee /etc/sysctl.d/40-repld.conf && "
    "sudo sysctl --system`, then restart repld"
)


# The events that can mean a change. Left out, so the kernel does not even queue them: opens and
# reads (every block served to a peer would cost an event or two), and the "directory modified"
# event watchdog adds for the parent of every created or deleted entry (the entry's own event
# names the path already).
EVENTS = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,  # chmod, chown, utime (FileModifiedEvent puts IN_ATTRIB in the mask)
    DirAttribEvent,
    FileClosedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
]


def watch_limit() -> str:
    try:
        return Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip()
    except OSError:
        return "unknown"


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher):
        self.w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, (DirModifiedEvent, FileOpenedEvent, FileClosedNoWriteEvent)):
            return  # a directory's own mtime, or a read: the children's events say what changed
        paths = [event.src_path]
        dest = getattr(event, "dest_path", "")
        if dest:
            paths.append(dest)
        self.w.add([os.fsdecode(p) for p in paths])


class _OverflowSpy(logging.Handler):
    """watchdog only logs an inotify queue overflow; that warning is our cue to scan everything."""

    def __init__(self, watcher: Watcher):
        super().__init__(logging.WARNING)
        self.w = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.w.request_full_scan()


class Watcher:
    """Watches ``root`` recursively; ``wake`` is a file descriptor written once per burst."""

    def __init__(self, root: Path, wake_fd: int, *, exclude: tuple[Path, ...] = ()):
        self.root = str(root)
        self._prefix = self.root.rstrip("/") + "/"
        self.wake_fd = wake_fd
        self.exclude = tuple(str(p).rstrip("/") + "/" for p in exclude)
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._full = False
        self._first = 0.0
        self._last = 0.0
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._spy: _OverflowSpy | None = None
        self.degraded = ""  # why watching is incomplete, for status and logs

    def start(self) -> bool:
        """Start watching; False (and ``degraded`` says why) if the tree cannot be watched."""
        observer = Observer()
        observer.schedule(_Handler(self), self.root, recursive=True, event_filter=EVENTS)
        try:
            observer.start()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.degraded = "inotify watch limit reached"
            else:
                self.degraded = f"cannot watch {self.root}: {e.strerror or e}"
            try:
                observer.stop()
            except Exception:
                pass
            return False
        self._observer = observer
        self._spy = _OverflowSpy(self)
        logging.getLogger("watchdog.observers").addHandler(self._spy)
        return True

    def stop(self) -> None:
        if self._spy is not None:
            logging.getLogger("watchdog.observers").removeHandler(self._spy)
            self._spy = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    @property
    def alive(self) -> bool:
        """False when watchdog's thread died (for instance on a watch it could not add later)."""
        return self._observer is not None and self._observer.is_alive()

    def add(self, abs_paths: list[str]) -> None:
        rels = []
        for p in abs_paths:
            if p.startswith(self.exclude) or p.rstrip("/") + "/" in self.exclude:
                continue
            if p == self.root:
                rels.append("")
                continue
            if not p.startswith(self._prefix):
                continue
            rel = p[len(self._prefix) :]
            if rel.rpartition("/")[2].startswith(TEMP_PREFIX):
                continue  # our own temporary files; their rename names the real path
            rels.append(rel)
        if not rels:
            return
        now = time.monotonic()
        with self._lock:
            wake = not self._paths and not self._full
            if wake:
                self._first = now
            self._last = now
            if "" in rels:
                self._full = True
            self._paths.update(rels)
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
        """Seconds until pending paths should be scanned (0: now); None if nothing is pending."""
        with self._lock:
            if not self._paths and not self._full:
                return None
            now = time.monotonic()
            return max(0.0, min(self._last + quiet, self._first + longest) - now)

    def take(self) -> tuple[bool, list[str]]:
        """(full scan wanted, paths to scan), and forget them."""
        with self._lock:
            full, paths = self._full, sorted(self._paths)
            self._full = False
            self._paths = set()
        return full, paths
