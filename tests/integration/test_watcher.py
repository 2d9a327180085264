"""The watcher with real inotify: which directories get a watch, what an event tells, and what
happens beyond the kernel's watch limit (lowered for one daemon in a user namespace of its own)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from daemons import Cluster
from repld.daemon.watcher import Watcher

DEADLINE = 10.0


def inotify_watches() -> int:
    """How many inotify watches this process holds (what counts against the kernel's limit)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


class Hints:
    """A started Watcher on ``root`` and the paths it has reported so far."""

    def __init__(self, root: Path, ignored=None):
        self.r, self.w = os.pipe()
        self.watcher = Watcher(root, self.w, ignored=ignored)
        self.seen: set[str] = set()

    def __enter__(self) -> Hints:
        assert self.watcher.start(), self.watcher.degraded
        return self

    def __exit__(self, *exc: object) -> None:
        self.watcher.stop()
        os.close(self.r)
        os.close(self.w)

    def wait_for(self, path: str) -> set[str]:
        deadline = time.monotonic() + DEADLINE
        while path not in self.seen:
            assert time.monotonic() < deadline, f"no event for {path}; got {sorted(self.seen)}"
            if self.watcher.due(0, 0) is not None:
                self.seen.update(self.watcher.take()[1])
            else:
                time.sleep(0.01)
        return self.seen


def test_ignored_subtrees_take_no_watch_and_tell_nothing(tmp_path):
    for d in ("docs/a", "docs/b", ".cache/x/y", ".cache/z"):
        (tmp_path / d).mkdir(parents=True)
    before = inotify_watches()
    ignored = lambda path, is_dir: path == ".cache" or path.startswith(".cache/")  # noqa: E731
    with Hints(tmp_path, ignored) as h:
        assert inotify_watches() - before == 4  # the root, docs, docs/a, docs/b
        (tmp_path / ".cache" / "x" / "junk").write_text("junk")
        (tmp_path / "docs" / "a" / "note.txt").write_text("note")
        seen = h.wait_for("docs/a/note.txt")  # events come in order: the junk one came first
        assert not any(p.startswith(".cache") for p in seen), seen
    assert inotify_watches() == before  # stopping gives every watch back


def test_new_and_moved_directories_are_watched(tmp_path):
    (tmp_path / "old").mkdir()
    with Hints(tmp_path) as h:
        (tmp_path / "new" / "sub").mkdir(parents=True)
        h.wait_for("new")
        deadline = time.monotonic() + DEADLINE
        while inotify_watches() < 4:  # root, old, new, new/sub: watched as soon as seen
            assert time.monotonic() < deadline, "new/sub never got a watch"
            time.sleep(0.01)
        (tmp_path / "new" / "sub" / "f.txt").write_text("f")
        h.wait_for("new/sub/f.txt")
        os.rename(tmp_path / "new", tmp_path / "renamed")
        assert {"new", "renamed"} <= h.wait_for("renamed")  # both ends of a move are hints
        (tmp_path / "renamed" / "sub" / "g.txt").write_text("g")
        h.wait_for("renamed/sub/g.txt")  # the watches followed the directory
        shutil.rmtree(tmp_path / "renamed")
        h.wait_for("renamed")


def test_what_a_new_directory_held_before_its_watch_is_hinted_path_by_path(tmp_path):
    """Files made in a new directory before the watcher could watch it have no event of their
    own: the directory's hint stood for them, and the daemon drops that hint as an echo when
    it made a directory there itself. git removing and making again a directory on checkout
    lost a file that way (a trial: every side "in sync", one file never recorded). Each entry
    the watcher finds when it starts to watch a directory just made is now a hint."""
    with Hints(tmp_path) as h:
        with h.watcher._wlock:  # the inotify thread waits: nothing new is watched meanwhile
            (tmp_path / "lib" / "sub").mkdir(parents=True)
            (tmp_path / "lib" / "b.c").write_text("made before the watch\n")
            (tmp_path / "lib" / "sub" / "c.c").write_text("and so was this\n")
        seen = h.wait_for("lib/b.c")
        h.wait_for("lib/sub/c.c")
        assert "lib" in seen and "lib/sub" in seen


def _can_limit_watches() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c",
         "echo 5 > /proc/sys/user/max_inotify_watches"],
        capture_output=True,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.mark.skipif(not _can_limit_watches(), reason="needs unshare and user namespaces")
def test_beyond_the_watch_limit_it_says_so_once_and_rescans(tmp_path):
    with Cluster(tmp_path) as cluster:
        a, b = cluster.make("a", "b")
        for i in range(8):
            (a.root / f"d{i}").mkdir()
            (a.root / f"d{i}" / "f.txt").write_text(f"file {i}\n")
        # In a user namespace of its own, a's daemon may hold 4 watches: the root and 3 of the
        # 8 directories. The limit counts per user, so nothing else can take from it.
        limit = ["unshare", "--user", "--map-root-user", "sh", "-c",
                 'echo 4 > /proc/sys/user/max_inotify_watches && exec "$@"', "sh"]  # fmt: skip
        a.start(wrap=limit)
        b.start()
        cluster.wait_converged(what="the first sync")
        st = a.status()
        assert st is not None and st["watching"] and st["unwatched_dirs"] == 5, st
        log = a.log.read_text()
        assert log.count("inotify watch limit is reached") == 1, log
        assert "5 directories of the tree could not be watched so far" in log, log
        assert "fs.inotify.max_user_watches=524288" in log, log
        human = a("status").stdout
        assert "5 directories beyond the inotify watch limit" in human, human

        (a.root / "top.txt").write_text("the root is watched\n")
        cluster.wait_converged(what="a change in a watched directory")
        for i in range(8):
            (a.root / f"d{i}" / "f.txt").write_text(f"edited {i}\n")
        a("rescan")  # the unwatched ones wait for the minute's rescan, or for this
        cluster.wait_converged(what="the changes in unwatched directories, after a rescan")
        assert all(
            (b.root / f"d{i}" / "f.txt").read_text() == f"edited {i}\n" for i in range(8)
        )
        assert a.log.read_text().count("inotify watch limit is reached") == 1
