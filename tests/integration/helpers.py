"""Helpers for tests that drive the real `repld` command on real directories."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPLD = [sys.executable, "-m", "repld.daemon.cli"]
POLL = 0.05


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 30.0,
             explain: Callable[[], str] = str) -> Any:  # fmt: skip
    """Poll ``cond`` until it returns something true (returned), or fail at the deadline,
    saying what was awaited and (``explain``) what the state was."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{explain()}")
        time.sleep(POLL)
    return got


def run(*args: str | os.PathLike[str], check: bool = True, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*REPLD, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"repld {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@dataclass
class Rep:
    name: str
    root: Path
    config: Path

    def __call__(
        self, *args: str | os.PathLike[str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run("--config", self.config, *args, check=check)

    def sync(self, other: Rep, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("sync", other.config, *args, check=check)

    def identity(self) -> dict[str, str]:
        return json.loads(self("id", "--json").stdout)

    def tree_id(self) -> str:
        return self.identity()["tree_id"]

    @property
    def state(self) -> Path:
        return self.config.parent / f"{self.config.stem}.state"


def make_replicas(tmp: Path, *names: str) -> list[Rep]:
    reps: list[Rep] = []
    tree = None
    for name in names:
        root = tmp / name
        root.mkdir(exist_ok=True)
        rep = Rep(name, root, tmp / f"{name}.toml")
        args = ["init", root, "--name", name]
        if tree:
            args += ["--tree-id", tree]
        rep(*args)
        tree = tree or rep.tree_id()
        reps.append(rep)
    return reps


def sync_in_process(a: Rep, b: Rep) -> Any:
    """``a.sync(b)`` in this process (where a test's monkeypatch reaches): the SyncReport."""
    from repld.daemon.localsync import sync
    from repld.daemon.replica import open_replica

    left, right = open_replica(a.config), open_replica(b.config)
    try:
        return sync(left, right)
    finally:
        left.close()
        right.close()


class Appender:
    """A program that holds files open for appending (as a log writer does) and writes each
    line given to the first: ``with Appender(path, ...) as w: w.line("x")``; it closes them
    at ``close()`` or at the end of the block."""

    SCRIPT = ("import sys\n"
              "files = [open(p, 'a') for p in sys.argv[1:]]\n"
              "for line in sys.stdin:\n    files[0].write(line); files[0].flush()\n")  # fmt: skip

    def __init__(self, *paths: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, *map(str, paths)],
                                     stdin=subprocess.PIPE, text=True)  # fmt: skip

    def line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None and exc[0] is not None:
            self.proc.kill()
        self.close()


def snapshot(root: Path, *, mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything a user would compare: paths, kinds, content, permissions, links (and mtimes)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            try:
                st = p.lstat()
                if stat.S_ISLNK(st.st_mode):
                    out[rel] = ("link", os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    out[rel] = ("dir", stat.S_IMODE(st.st_mode))
                elif not stat.S_ISREG(st.st_mode):
                    out[rel] = ("special", stat.S_IFMT(st.st_mode))  # a FIFO: reading it blocks
                else:
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                    mtime = (st.st_mtime_ns,) if mtimes else ()
                    out[rel] = ("file", digest, stat.S_IMODE(st.st_mode), *mtime)
            except FileNotFoundError:
                # A live tree changed under the walk (a daemon's temp file renamed into place):
                # this snapshot matches no other, and a poll looks again.
                out[rel] = ("vanished while read",)
    return out


def files_bytes(root: Path) -> dict[str, bytes]:
    """Every file below root with its exact bytes (for 'nothing changed' checks)."""
    return {
        p.relative_to(root).as_posix(): (
            p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        )
        for p in sorted(root.rglob("*"))
    }


def conflict_copies(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.conflict-*"))



@contextmanager
def tmpfs(at: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` ("4m") mounted on the directory ``at``, unmounted at the end; the
    test is skipped where mounting is not allowed (not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(at)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)
