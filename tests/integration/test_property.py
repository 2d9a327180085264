"""Stateful property test of replication: 3-4 replicas of one tree, random edits, random syncs.

Every example makes 3 or 4 replicas of one tree in a temporary directory (real files, real SQLite,
driven through the Python API: ``init``, ``open_replica``, ``localsync.sync``), then runs random
steps on random replicas: create a file (small, now and then several blocks) or a symlink, edit (in
place or by atomic replace), chmod (a file's exec bits, a directory's group/other bits), retarget a
symlink, rename/move, delete, mkdir, rmtree, scan (maybe after reopening the replica), pairwise
syncs, and now and then a dry run (which must change nothing, on disk or in either database), a
pull-only or push-only sync, or a sync of one subtree. Names come from a tiny alphabet so that the
same path is touched on several replicas all the time, and a name is as often a file as a
directory. After every sync without errors, both databases must describe their disks exactly.

At the end, all pairs are synced until a round changes nothing (at most ``MAX_ROUNDS`` rounds), and
then:

1. every replica's tree is identical (paths, kinds, content, mode, file mtime, symlink targets),
   and nothing is left outside the roots, and no temporary file is left inside them;
2. every replica's database agrees with its disk, and all databases hold the same versions;
3. no content is lost: every content a replica ever wrote is somewhere in the final tree (maybe
   as a conflict copy), unless some replica superseded it *knowingly*: edited, deleted, renamed
   over or rmtree'd it while it was on its disk;
4. conflict copies only come from concurrent changes: a copy of ``P`` needs two changes of
   ``P`` (or of a path above or below it) on two replicas, neither of which knew the other;
5. deleted files never come back: a path deleted by a change that knew every other change of that
   path (and of the paths above and below it) is absent at the end.

The model behind 3-5 is a vector clock per replica. Every user change is an event stamped with its
replica's clock; a sync pass that finishes without errors gives the receiving replica the
sender's clock (a pass with errors gives it nothing: the model may then know *less* than repld,
which only ever weakens 4 and 5, never makes them wrong). The content model needs no clocks: what
a replica had on disk when it overwrote or deleted it is "knowingly superseded".

mtimes: every write gets a fresh, strictly increasing mtime (``os.utime``), so that the scanner's
(size, mtime, mode, inode) change detection cannot miss an edit made within one clock tick; that
weakness is real (an edit that keeps size and mtime is never seen) but is not what this tests.

Profiles: ``REPLD_HYPOTHESIS_PROFILE=nightly`` for a long run (see tests/conftest.py).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from repld.daemon.localsync import Direction, SyncReport, sync
from repld.daemon.replica import Replica, init, open_replica
from repld.protocol.record import CONFLICT_MARK, TEMP_PREFIX, Kind, conflict_original

pytestmark = [pytest.mark.property]

# A tiny alphabet: every name is used for files and for directories, at depth 1 and 2.
NAMES = ("a", "b.txt", ".c")
PATHS = tuple([*NAMES, *(f"{d}/{n}" for d in NAMES for n in NAMES)])
# Symlink targets: "." and ".." point at the root and outside it (nothing may be written through
# them); "b.txt" points into the tree; the last one dangles.
LINK_TARGETS = (".", "..", "b.txt", "nowhere/at/all")
MAX_ROUNDS = 5  # of all-pairs syncs at the end, the last of which must change nothing
EDIT_TMP = ".edit-tmp"  # an editor's temporary file for atomic-replace edits (never synced)

# Bugs this test found that are still open. While one is listed here, the machine steers clear of
# the scenario or tolerates that one symptom (look for the key below), so that the rest of the
# property keeps running; each has a plain, strict-xfail reproduction at the end of this file.
# Delete the entry when the bug is fixed (its xfail test then fails as XPASS, as a reminder).
# (Found and already fixed: a file moved onto a path with a history restarted that history; a
# one-way sync handed out versions from a scan it rolled back; a directory kept because it held
# files lost the file that was to replace it; a same-content merge took its metadata from
# whichever record was local when the winner key tied, so a chmod diverged; the planner read
# stale records for conflict copies it had planned earlier in the same pass, and a copy named
# by content alone could land on an earlier copy's tombstone and be skipped; a parent directory
# created for an incoming file got a version of its own, which beat a deletion made elsewhere;
# conflict_original named the wrong original for a copy of an extensionless conflict copy.)
KNOWN_BUGS: dict[str, str] = {}  # none open

REPLICA = st.integers(0, 3)  # taken modulo the number of replicas
PICK = st.integers(0, 63)  # picks one existing entry, modulo how many there are
PAYLOAD = st.binary(max_size=24)
REUSE = st.integers(0, 15)  # 15: an earlier content (same content on two paths); 14: a big one


def related(p: str, q: str) -> bool:
    """Same path, or one is inside the other."""
    return p == q or p.startswith(q + "/") or q.startswith(p + "/")


MARK_RE = re.compile(re.escape(CONFLICT_MARK) + r"[0-9a-f]{8}-[0-9a-f]{8}")


def originals(path: str) -> set[str]:
    """Every path a conflict copy could be the copy of: its name less any one conflict mark."""
    head, _, name = path.rpartition("/")
    out = set()
    for m in MARK_RE.finditer(name):
        original = name[: m.start()] + name[m.end() :]
        out.add(f"{head}/{original}" if head else original)
    return out


def lineage(path: str) -> set[str]:
    """The path and, if it is a conflict copy, everything it may be a copy of, recursively."""
    out = {path}
    todo = [path]
    while todo:
        for o in originals(todo.pop()):
            if o not in out:
                out.add(o)
                todo.append(o)
    return out


@dataclass(frozen=True)
class Event:
    """One user change on one replica, stamped with that replica's vector clock."""

    replica: int
    n: int
    clock: dict[int, int]
    mods: frozenset[str]  # every path it created, changed or removed
    deletes: frozenset[str]  # the paths it removed
    what: str

    def before(self, other: Event) -> bool:
        """Happened before ``other``: ``other``'s replica knew this event when it made ``other``."""
        return self is not other and other.clock.get(self.replica, 0) >= self.n


F = TypeVar("F", bound=Callable[..., Any])


def step(fn: F) -> F:
    """Marks the machine busy while a step runs: if the step fails, teardown skips the final check
    (so the failure hypothesis shrinks is the step's own)."""

    @functools.wraps(fn)
    def wrapper(self: ReplicationMachine, *args: Any, **kwargs: Any) -> Any:
        self.busy = True
        result = fn(self, *args, **kwargs)
        self.busy = False
        return result

    return wrapper  # type: ignore[return-value]


def say(text: str) -> None:
    """``note`` inside a hypothesis run; print outside one (replaying a failure by hand)."""
    try:
        note(text)
    except InvalidArgument:
        print(text)


def lstat(path: Path) -> os.stat_result | None:
    """lstat, or None when nothing is there (or a parent is a file or a symlink loop)."""
    try:
        return os.lstat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def walk(root: Path) -> dict[str, os.stat_result]:
    """Every entry below ``root`` (never following symlinks), relative path -> lstat."""
    out: dict[str, os.stat_result] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                st_ = entry.stat(follow_symlinks=False)
                out[path] = st_
                if stat.S_ISDIR(st_.st_mode):
                    stack.append(path)
    return dict(sorted(out.items()))


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """What a user compares: kind, content, mode, mtime (files), target (symlinks)."""
    out: dict[str, tuple[Any, ...]] = {}
    for path, st_ in walk(root).items():
        if stat.S_ISLNK(st_.st_mode):
            out[path] = ("link", os.readlink(root / path))
        elif stat.S_ISDIR(st_.st_mode):
            out[path] = ("dir", stat.S_IMODE(st_.st_mode))
        elif stat.S_ISREG(st_.st_mode):
            content = (root / path).read_bytes()
            out[path] = ("file", content, stat.S_IMODE(st_.st_mode), st_.st_mtime_ns)
        else:
            out[path] = ("other", st_.st_mode)
    return out


def describe_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    lines = []
    for path in sorted(a.keys() | b.keys()):
        if a.get(path) != b.get(path):
            lines.append(f"  {path!r}: {a.get(path)!r} != {b.get(path)!r}")
    return "\n".join(lines)


def quiet(report: SyncReport) -> bool:
    """The sync found nothing to scan, apply or record, and no error."""
    if report.errors or any(s.events for s in report.scans.values()):
        return False
    for p in report.passes:
        s = p.stats
        if s.written or s.deleted or s.recorded or s.conflicts or s.kept_dirs:
            return False
    return True


class ReplicationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="repld-prop-"))
        self.roots: list[Path] = []
        self.configs: list[Path] = []
        self.reps: list[Replica] = []
        self.clocks: list[dict[int, int]] = []
        self.events: list[Event] = []
        self.written: dict[bytes, str] = {}  # content -> who wrote it first (for messages)
        self.superseded: set[bytes] = set()
        self.contents = 0
        self.mtime = time.time_ns()
        self.busy = False

    # -- set-up and tear-down -------------------------------------------------------------------

    @initialize(n=st.integers(3, 4))
    def make_replicas(self, n: int) -> None:
        tree = str(uuid.uuid4())
        for i in range(n):
            root = self.base / f"r{i}"
            root.mkdir()
            config = self.base / f"c{i}" / "config.toml"
            init(config, root, name=f"r{i}", tree_id=tree)
            self.roots.append(root)
            self.configs.append(config)
            self.reps.append(open_replica(config))
            self.clocks.append({})

    def teardown(self) -> None:
        try:
            if self.reps and not self.busy:
                self.busy = True
                self.check_final()
        finally:
            for rep in self.reps:
                rep.close()
            shutil.rmtree(self.base, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------

    def _r(self, r: int) -> int:
        return r % len(self.reps)

    def _exists(self, *kinds: int) -> bool:
        return any(
            stat.S_IFMT(st_.st_mode) in kinds for root in self.roots for st_ in walk(root).values()
        )

    def _pick(self, kinds: tuple[int, ...], k: int) -> tuple[int, str] | None:
        """The k-th (modulo) existing entry of one of ``kinds`` on any replica: (replica, path)."""
        entries = [
            (r, p)
            for r, root in enumerate(self.roots)
            for p, st_ in walk(root).items()
            if stat.S_IFMT(st_.st_mode) in kinds
        ]
        return entries[k % len(entries)] if entries else None

    def _missing_parents(self, r: int, path: str) -> list[str] | None:
        """Parents of ``path`` that do not exist yet, or None if one is not a directory."""
        parts = path.split("/")
        missing = []
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            st_ = lstat(self.roots[r] / parent)
            if st_ is None:
                missing.append(parent)
            elif not stat.S_ISDIR(st_.st_mode):
                return None
        return missing

    def _mkdirs(self, r: int, dirs: list[str]) -> None:
        for d in dirs:
            os.mkdir(self.roots[r] / d)
            os.chmod(self.roots[r] / d, 0o755)

    def _content(self, payload: bytes, reuse: int, r: int, path: str) -> bytes:
        if reuse == 15 and self.written:
            known = sorted(self.written)
            return known[len(payload) % len(known)]
        self.contents += 1
        content = b"<%d>" % self.contents + payload
        if reuse == 14:  # now and then a file of several blocks (blocks are 128 KiB)
            content += (payload or b"-") * (300_000 // max(1, len(payload)))
        self.written[content] = f"r{r}:{path}"
        return content

    def _touch(self, path: Path) -> None:
        self.mtime = max(time.time_ns(), self.mtime + 1_000_000)
        os.utime(path, ns=(self.mtime, self.mtime), follow_symlinks=False)

    def _supersede(self, r: int, path: str) -> list[str]:
        """Mark every file content at or below ``path`` on replica r as knowingly superseded;
        return every path at or below it."""
        root = self.roots[r]
        st_ = lstat(root / path)
        if st_ is None:
            return []
        paths = [path]
        if stat.S_ISDIR(st_.st_mode):
            paths += [f"{path}/{p}" for p in walk(root / path)]
        for p in paths:
            if stat.S_ISREG(os.lstat(root / p).st_mode):
                self.superseded.add((root / p).read_bytes())
        return paths

    def _event(
        self, r: int, what: str, mods: set[str] | list[str], deletes: set[str] | list[str] = ()
    ) -> None:
        clock = self.clocks[r]
        clock[r] = clock.get(r, 0) + 1
        event = Event(r, clock[r], dict(clock), frozenset(mods), frozenset(deletes), what)
        self.events.append(event)

    # -- user changes ---------------------------------------------------------------------------
    # Rules that create take a replica and a path from the alphabet; rules that change or remove
    # take the k-th existing entry of the right kind on any replica (so they seldom do nothing).

    @rule(
        r=REPLICA,
        path=st.sampled_from(PATHS),
        payload=PAYLOAD,
        reuse=REUSE,
        exe=st.booleans(),
        link=st.sampled_from((None,) * 6 + LINK_TARGETS),  # 60 % files, 40 % symlinks
    )
    @step
    def create(
        self, r: int, path: str, payload: bytes, reuse: int, exe: bool, link: str | None
    ) -> None:
        r = self._r(r)
        full = self.roots[r] / path
        missing = self._missing_parents(r, path)
        if missing is None or lstat(full) is not None:
            return
        self._mkdirs(r, missing)
        if link is not None:
            os.symlink(link, full)
            self._event(r, f"symlink {path} -> {link}", {path, *missing})
            return
        content = self._content(payload, reuse, r, path)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(full, 0o755 if exe else 0o644)
        self._touch(full)
        self._event(r, f"create {path}", {path, *missing})

    @rule(
        r=REPLICA,
        path=st.sampled_from(PATHS),
        payload=PAYLOAD,
        reuse=REUSE,
        exe=st.booleans(),
        link=st.sampled_from((None,) * 6 + LINK_TARGETS),
    )
    def create_more(  # (twice as many creations as other changes)
        self, r: int, path: str, payload: bytes, reuse: int, exe: bool, link: str | None
    ) -> None:
        self.create(r, path, payload, reuse, exe, link)

    @precondition(lambda self: self._exists(stat.S_IFREG))
    @rule(k=PICK, payload=PAYLOAD, reuse=REUSE, replace=st.booleans())
    @step
    def edit(self, k: int, payload: bytes, reuse: int, replace: bool) -> None:
        picked = self._pick((stat.S_IFREG,), k)
        if picked is None:
            return
        r, path = picked
        full = self.roots[r] / path
        self._supersede(r, path)
        content = self._content(payload, reuse, r, path)
        mode = stat.S_IMODE(os.lstat(full).st_mode)
        if replace:  # as editors do: a temporary file beside it, renamed over it (new inode)
            tmp = full.parent / EDIT_TMP
            tmp.write_bytes(content)
            os.chmod(tmp, mode)
            os.rename(tmp, full)
        else:  # in place, same inode
            fd = os.open(full, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
        self._touch(full)
        self._event(r, f"edit {path}", {path})

    @precondition(lambda self: self._exists(stat.S_IFREG, stat.S_IFDIR))
    @rule(k=PICK)
    @step
    def chmod(self, k: int) -> None:
        """Toggle a file's exec bits (755/644) or a directory's group and other bits (755/700)."""
        picked = self._pick((stat.S_IFREG, stat.S_IFDIR), k)
        if picked is None:
            return
        r, path = picked
        full = self.roots[r] / path
        mode = os.lstat(full).st_mode
        os.chmod(full, stat.S_IMODE(mode) ^ (0o055 if stat.S_ISDIR(mode) else 0o111))
        self._event(r, f"chmod {path}", {path})

    @precondition(lambda self: self._exists(stat.S_IFLNK))
    @rule(k=PICK, to=st.sampled_from(LINK_TARGETS))
    @step
    def retarget(self, k: int, to: str) -> None:
        """Point a symlink elsewhere (ln -sfn)."""
        picked = self._pick((stat.S_IFLNK,), k)
        if picked is None:
            return
        r, path = picked
        full = self.roots[r] / path
        if os.readlink(full) == to:
            return
        os.unlink(full)
        os.symlink(to, full)
        self._event(r, f"retarget {path} -> {to}", {path})

    @precondition(lambda self: self._exists(stat.S_IFREG, stat.S_IFLNK))
    @rule(k=PICK, dest=st.sampled_from(PATHS))
    @step
    def rename(self, k: int, dest: str) -> None:
        picked = self._pick((stat.S_IFREG, stat.S_IFLNK), k)
        if picked is None:
            return
        r, src = picked
        missing = self._missing_parents(r, dest)
        if src == dest or missing is None:
            return
        dest_st = lstat(self.roots[r] / dest)
        if dest_st is not None and stat.S_ISDIR(dest_st.st_mode):
            return
        self._supersede(r, dest)
        self._mkdirs(r, missing)
        os.rename(self.roots[r] / src, self.roots[r] / dest)
        self._event(r, f"rename {src} -> {dest}", {src, dest, *missing}, {src})

    @precondition(lambda self: self._exists(stat.S_IFREG, stat.S_IFLNK))
    @rule(k=PICK)
    @step
    def delete(self, k: int) -> None:
        picked = self._pick((stat.S_IFREG, stat.S_IFLNK), k)
        if picked is None:
            return
        r, path = picked
        self._supersede(r, path)
        os.unlink(self.roots[r] / path)
        self._event(r, f"delete {path}", {path}, {path})

    @rule(r=REPLICA, path=st.sampled_from(PATHS))
    @step
    def mkdir(self, r: int, path: str) -> None:
        r = self._r(r)
        missing = self._missing_parents(r, path)
        if missing is None or lstat(self.roots[r] / path) is not None:
            return
        self._mkdirs(r, [*missing, path])
        self._event(r, f"mkdir {path}", {path, *missing})

    @precondition(lambda self: self._exists(stat.S_IFDIR))
    @rule(k=PICK)
    @step
    def rmtree(self, k: int) -> None:
        picked = self._pick((stat.S_IFDIR,), k)
        if picked is None:
            return
        r, path = picked
        gone = self._supersede(r, path)
        shutil.rmtree(self.roots[r] / path)
        self._event(r, f"rmtree {path}", gone, gone)

    # -- repld ----------------------------------------------------------------------------------

    @rule(r=REPLICA, reopen=st.booleans())
    @step
    def scan(self, r: int, reopen: bool) -> None:
        """A scan without a sync (events are then grouped differently), maybe after a restart."""
        r = self._r(r)
        if reopen:
            self.reps[r].close()
            self.reps[r] = open_replica(self.configs[r])
        stats = self.reps[r].scan()
        assert not stats.errors, f"scan of r{r}: {stats.errors}"

    @rule(left=REPLICA, right=REPLICA)
    @step
    def sync_pair(self, left: int, right: int) -> None:
        self._sync(left, right)

    @rule(left=REPLICA, right=REPLICA)
    @step
    def sync_another_pair(self, left: int, right: int) -> None:  # (twice as many syncs)
        self._sync(left, right)

    @rule(
        left=REPLICA,
        right=REPLICA,
        how=st.sampled_from(("dry-run", "pull-only", "push-only", "subtree")),
        prefix=st.sampled_from(NAMES),
    )
    @step
    def sync_special(self, left: int, right: int, how: str, prefix: str) -> None:
        """A dry run (must change nothing anywhere), a one-way sync, or a sync of one subtree."""
        left, right = self._pair(left, right)
        lrep, rrep = self.reps[left], self.reps[right]
        if how == "dry-run":
            before = (self._state(left), self._state(right))
            sync(lrep, rrep, dry_run=True)
            after = (self._state(left), self._state(right))
            assert after == before, f"dry run r{left} r{right} changed something"
            return
        if how == "subtree":
            # Marks do not move: the model learns nothing (it may know less than repld: safe).
            sync(lrep, rrep, paths=[prefix])
            return
        into, src = (left, right) if how == "pull-only" else (right, left)
        direction = Direction.PULL if how == "pull-only" else Direction.PUSH
        report = sync(lrep, rrep, direction=direction)
        if report.errors:
            say(f"sync --{how} r{left} r{right}: errors {report.errors}")
        if not report.errors:
            self._learn(into, src)

    def _state(self, r: int) -> tuple[object, ...]:
        """Everything a dry run must leave alone: the tree, the records, the history, the marks."""
        store = self.reps[r].store
        records = list(store.iter_paths())
        history = store.db.execute("SELECT count(*), max(seq) FROM history").fetchone()
        return snapshot(self.roots[r]), records, history, store.seq, store.peer_marks()

    def _pair(self, left: int, right: int) -> tuple[int, int]:
        n = len(self.reps)
        left %= n
        right %= n
        if left == right:
            right = (left + 1) % n
        return left, right

    def _sync(self, left: int, right: int) -> SyncReport:
        left, right = self._pair(left, right)
        report = sync(self.reps[left], self.reps[right])
        if report.errors:
            say(f"sync r{left} r{right}: errors {report.errors}")
        if any(s.errors for s in report.scans.values()):
            return report
        # Pass 1 brings right's records into left; pass 2 brings left's (now including right's)
        # into right. A pass without errors gives the receiver everything the sender knew.
        into_left, into_right = report.passes
        if not into_left.stats.errors:
            self._learn(left, right)
        if not into_right.stats.errors:
            self._learn(right, left)
        if not report.errors:  # then both databases describe their disks exactly
            for r in (left, right):
                self._check_database(r, snapshot(self.roots[r]))
        return report

    def _check_database(self, r: int, snap: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
        """Replica r's live records describe exactly its disk; returns every record's version."""
        live: dict[str, tuple[Any, ...]] = {}
        versions: dict[str, Any] = {}
        for rec in self.reps[r].store.iter_paths():
            versions[rec.path] = (rec.version.encode(), rec.deleted)
            if rec.deleted:
                continue
            if rec.kind is Kind.FILE:
                live[rec.path] = ("file", rec.sha256, rec.mode, rec.mtime_ns)
            elif rec.kind is Kind.DIR:
                live[rec.path] = ("dir", rec.mode)
            else:
                live[rec.path] = ("link", rec.target)
        disk = {
            path: ("file", hashlib.sha256(v[1]).hexdigest(), *v[2:]) if v[0] == "file" else v
            for path, v in snap.items()
        }
        assert live == disk, f"r{r}: database and disk differ:\n{describe_diff(live, disk)}"
        return versions

    def _learn(self, into: int, src: int) -> None:
        for r, c in self.clocks[src].items():
            self.clocks[into][r] = max(c, self.clocks[into].get(r, 0))

    # -- the end --------------------------------------------------------------------------------

    def check_final(self) -> None:
        n = len(self.reps)
        pairs = list(itertools.combinations(range(n), 2))
        for _ in range(MAX_ROUNDS):
            reports = [(i, j, self._sync(i, j)) for i, j in pairs]
            if all(quiet(rep) for _, _, rep in reports):
                break
        else:
            busy = [
                f"r{i}-r{j}: errors={rep.errors} "
                f"scans={ {k: s.events for k, s in rep.scans.items()} } "
                f"passes={[(p.into, p.stats.written, p.stats.deleted, p.stats.recorded, p.stats.conflicts, p.stats.kept_dirs) for p in rep.passes]}"  # noqa: E501
                for i, j, rep in reports
                if not quiet(rep)
            ]
            raise AssertionError(
                f"no fixpoint after {MAX_ROUNDS} rounds of all-pairs syncs; last round:\n"
                + "\n".join(busy)
            )

        snaps = [snapshot(root) for root in self.roots]
        say(f"final tree: {snaps[0]!r}")

        # 1. Identical trees; nothing outside the roots; no temporary file left.
        for r in range(1, n):
            assert snaps[r] == snaps[0], f"r0 and r{r} differ:\n{describe_diff(snaps[0], snaps[r])}"
        expected = {f"r{i}" for i in range(n)} | {f"c{i}" for i in range(n)}
        assert set(os.listdir(self.base)) == expected, f"outside the roots: {os.listdir(self.base)}"
        for i in range(n):
            assert set(os.listdir(self.base / f"c{i}")) == {"config.toml", "config.state"}
        leftovers = [
            p for p in snaps[0] if p.rpartition("/")[2].startswith((TEMP_PREFIX, EDIT_TMP))
        ]
        assert not leftovers, f"temporary files left: {leftovers}"

        # 2. Each database agrees with its disk; all databases hold the same versions.
        tree = snaps[0]
        versions = [self._check_database(r, snaps[r]) for r in range(n)]
        for r in range(1, n):
            assert versions[r] == versions[0], (
                f"r0 and r{r} hold different versions:\n{describe_diff(versions[0], versions[r])}"
            )

        # 3. No content lost unless some replica knowingly superseded it.
        present = {v[1] for v in tree.values() if v[0] == "file"}
        lost = {
            c: who
            for c, who in self.written.items()
            if c not in present and c not in self.superseded
        }
        assert not lost, f"content lost, though no replica that had it replaced it: {lost}"

        # 4. Conflict copies only where two replicas changed related paths concurrently.
        contested: set[str] = set()
        for e1, e2 in itertools.combinations(self.events, 2):
            if e1.replica == e2.replica or e1.before(e2) or e2.before(e1):
                continue
            for m1, m2 in itertools.product(e1.mods, e2.mods):
                if related(m1, m2):
                    contested |= {m1, m2}
        for path in tree:
            if CONFLICT_MARK not in path.rpartition("/")[2]:
                continue
            original = conflict_original(path)
            assert original is not None, f"{path}: looks like a conflict copy but does not parse"
            # A copy of P (or of a copy of P) needs concurrent changes of P, or above or below it.
            # (lineage, not only conflict_original: a copy of a copy's original is a copy too)
            candidates = lineage(path) - {path}
            assert any(related(o, c) for o in candidates for c in contested), (
                f"conflict copy {path} but no two replicas changed {original} concurrently "
                f"(concurrently changed paths: {sorted(contested)})"
            )

        # 5. Deleted files never come back.
        for d in self.events:
            for path in d.deletes:
                # A conflict copy is also touched by whatever touches its original.
                family = lineage(path)
                touching = [
                    e for e in self.events if any(related(m, f) for m in e.mods for f in family)
                ]
                if all(e is d or e.before(d) for e in touching):
                    assert path not in tree, (
                        f"{path} came back: deleted on r{d.replica} ({d.what}) after every other "
                        f"change to it, yet it is {tree[path]!r}"
                    )


def _property_settings() -> settings:
    profile = os.environ.get("REPLD_HYPOTHESIS_PROFILE", "default")
    try:  # registered in tests/conftest.py
        return settings.get_profile(f"property-{profile}")
    except InvalidArgument:
        return settings(max_examples=300, stateful_step_count=40, deadline=None)


ReplicationMachine.TestCase.settings = _property_settings()
TestReplicationProperty = ReplicationMachine.TestCase


# -- known bugs found by the property test: minimal reproductions ----------------------------------
# Each is strict-xfail while its KNOWN_BUGS entry is there; when a fix makes one pass, pytest
# reports XPASS as a failure: delete the KNOWN_BUGS entry, and the property covers it again.


@pytest.fixture
def replicas(tmp_path: Path) -> Callable[[int], list[Replica]]:
    opened: list[Replica] = []

    def make(n: int) -> list[Replica]:
        tree = str(uuid.uuid4())
        for i in range(n):
            root = tmp_path / f"r{i}"
            root.mkdir()
            init(tmp_path / f"c{i}" / "config.toml", root, name=f"r{i}", tree_id=tree)
            opened.append(open_replica(tmp_path / f"c{i}" / "config.toml"))
        return opened

    yield make  # type: ignore[misc]
    for rep in opened:
        rep.close()


def files(rep: Replica) -> dict[str, bytes | str]:
    return {p: v[1] if v[0] in ("file", "link") else v[0] for p, v in snapshot(rep.root).items()}


def known_bug(key: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(key in KNOWN_BUGS, reason=f"known bug {key!r}", strict=True)


def test_fixed_bug_move_onto_deleted_path_kept_the_file(replicas):
    """Found by the property test; fixed in the scanner (a move continues the path's history)."""
    a, b, c = replicas(3)
    (a.root / "q").write_bytes(b"old q")
    sync(a, b)
    (a.root / "q").unlink()
    sync(a, b)  # q is a tombstone on a and b, version {a: 2}
    (a.root / "p").write_bytes(b"precious")
    sync(a, b)
    os.rename(a.root / "p", a.root / "q")  # the scan sees a move: q restarts at {a: 1}
    sync(a, b)  # b's tombstone {a: 2} dominates: b never gets q
    sync(b, c)  # c learns the tombstone from b
    sync(a, c)  # ... and hands it to a, which deletes q
    assert files(a) == files(b) == files(c) == {"q": b"precious"}


def test_fixed_bug_dir_replaced_by_file_lost_the_file(replicas):
    """Found by the property test; fixed in the applier (the kept directory's conflict copy)."""
    a, b = replicas(2)
    (a.root / "d").mkdir()
    sync(a, b)
    (a.root / "d").rmdir()
    (a.root / "d").write_bytes(b"a's file d")  # a: the directory d becomes a file
    (b.root / "d" / "y").write_bytes(b"b's d/y")  # b, meanwhile: a new file in d
    for _ in range(3):
        sync(a, b)
    # b keeps d (it holds y) with a version that dominates a's file, which every replica then
    # replaces with the directory: the file must be kept as a conflict copy beside it first.
    assert files(a) == files(b)
    assert files(a)["d"] == "dir" and files(a)["d/y"] == b"b's d/y"
    (copy,) = [p for p in files(a) if CONFLICT_MARK in p]
    assert files(a)[copy] == b"a's file d" and conflict_original(copy) == "d"


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_dir_replaced_by_file_is_kept_alike_by_replicas_that_keep_the_dir(replicas, kind):
    """b and c each keep d (each put a file in it) against a's file or symlink d, independently:
    they make the same single copy of it, and every replica ends with the same tree."""
    a, b, c = replicas(3)
    (a.root / "d").mkdir()
    sync(a, b)
    sync(a, c)
    (a.root / "d").rmdir()
    if kind == "file":
        (a.root / "d").write_bytes(b"a's file d")
    else:
        os.symlink("elsewhere", a.root / "d")
    (b.root / "d" / "y").write_bytes(b"b's d/y")
    (c.root / "d" / "z").write_bytes(b"c's d/z")
    sync(b, a, direction=Direction.PULL)  # b keeps d and makes the copy
    sync(c, a, direction=Direction.PULL)  # c does the same, independently
    assert files(b).keys() - {"d/y"} == files(c).keys() - {"d/z"}
    for _ in range(2):
        for x, y in itertools.combinations((a, b, c), 2):
            sync(x, y)
    assert files(a) == files(b) == files(c)
    copies = [p for p in files(a) if CONFLICT_MARK in p]
    assert len(copies) == 1 and conflict_original(copies[0]) == "d"
    assert files(a)[copies[0]] == (b"a's file d" if kind == "file" else "elsewhere")
    assert files(a)["d/y"] == b"b's d/y" and files(a)["d/z"] == b"c's d/z"


def test_fixed_bug_deleted_directory_came_back(replicas):
    """Found by the property test; fixed in the applier (a parent created for an incoming file is
    a placeholder with an empty version, not a change of its own)."""
    a, b, c = replicas(3)
    (a.root / "d").mkdir()
    (a.root / "d" / "x").write_bytes(b"x")
    sync(a, b)
    os.chmod(a.root / "d", 0o700)  # d's record now has a later sequence number than d/x
    sync(a, b)
    shutil.rmtree(b.root / "d")  # b deletes d, knowing everything that was ever in it
    sync(a, c)  # c gets d/x before d: the applier creates d, then d's record replaces it
    assert c.store.get("d").version == a.store.get("d").version
    for _ in range(2):
        sync(b, a)
        sync(b, c)
        sync(a, c)
    assert files(a) == files(b) == files(c) == {}


def test_directory_kept_then_deleted_by_the_keeper_stays_deleted(replicas):
    """Found by the property test (with the first fix of the parent rule, which bumped a parent
    created over a tombstone): a deletes d while b puts a new file in it; b keeps d, and a gets
    b's file before b's record of the kept d in the same pass. When b then deletes d, knowing
    everything, d must not come back."""
    a, b = replicas(2)
    (a.root / "d").mkdir()
    (a.root / "d" / "x").write_bytes(b"x")
    sync(a, b)
    shutil.rmtree(a.root / "d")
    (b.root / "d" / "new").write_bytes(b"new")
    sync(b, a)  # b keeps d (it holds new); a gets d/new, then the kept d
    assert files(a) == files(b) == {"d": "dir", "d/new": b"new"}
    assert a.store.get("d").version == b.store.get("d").version
    shutil.rmtree(b.root / "d")
    for _ in range(2):
        sync(a, b)
    assert files(a) == files(b) == {}


@pytest.mark.parametrize("every_holder_first", [False, True])
def test_file_new_to_the_deleter_brings_its_directory_back(replicas, every_holder_first):
    """The other half of the parent rule: a file created in d while another replica deleted d
    (not knowing it) reaches a third replica that holds d's tombstone: d comes back, with the
    file, everywhere, and every database agrees with its disk."""
    a, b, c = replicas(3)
    (a.root / "d").mkdir()
    (a.root / "d" / "x").write_bytes(b"x")
    sync(a, b)
    sync(a, c)
    shutil.rmtree(b.root / "d")  # b deletes d ...
    (a.root / "d" / "new").write_bytes(b"new in d")  # ... while a adds a file to it
    sync(c, b, direction=Direction.PULL)  # c takes the tombstones of d and d/x
    assert not (c.root / "d").exists()
    sync(c, a, direction=Direction.PULL)  # then d/new, unknown to b: d must come back on c
    assert files(c) == {"d": "dir", "d/new": b"new in d"}
    if every_holder_first:
        # Found by the property test (with a first fix that gave such a parent an empty version):
        # b too gets d/new before a ever sees b's deletion, so every tombstone of d is replaced
        # before a could keep d; a's old record of d, which both had already seen (and found
        # dominated by the tombstone), never came again: two versions of d forever.
        sync(b, c, direction=Direction.PULL)
    for _ in range(2):
        for x, y in itertools.combinations((a, b, c), 2):
            sync(x, y)
    assert files(a) == files(b) == files(c) == {"d": "dir", "d/new": b"new in d"}
    versions = {rep.store.get("d").version for rep in (a, b, c)}
    assert len(versions) == 1
    for rep in (a, b, c):
        live = {r.path for r in rep.store.iter_paths() if not r.deleted}
        assert live == set(files(rep)), f"{rep.cfg.name}: database and disk differ"


def test_fixed_bug_pull_only_handed_out_uncommitted_versions(replicas):
    """Found by the property test; fixed in localsync (a one-way sync commits the source's scan)."""
    a, b = replicas(2)
    (b.root / "f").write_bytes(b"v1")
    sync(a, b)
    (b.root / "f").write_bytes(b"v2 from b")
    # a pulls v2 with version {b: 2}; b's own scan (and its {b: 2}) is rolled back.
    sync(a, b, direction=Direction.PULL)
    (a.root / "f").write_bytes(b"a edits v2")  # {a: 1, b: 2}
    (b.root / "f").write_bytes(b"v3 from b")  # b's next scan records this as {b: 2} again
    for _ in range(2):
        sync(a, b)
    # a never saw v3, so a's edit must not "dominate" it: both are kept.
    assert b"v3 from b" in files(a).values()
    assert b"a edits v2" in files(a).values()
    assert files(a) == files(b)


def test_fixed_bug_conflict_copy_recorded_as_deleted(replicas):
    """Found by the property test; fixed in the planner (it sees the conflict copies it planned
    earlier in the same pass, not the database's stale record) and in copy names (they derive from
    the whole losing version, so a new copy never lands on an earlier copy's tombstone)."""
    from repld.protocol.record import conflict_copy_path

    a, b = replicas(2)
    t = time.time_ns()

    def write(rep: Replica, path: str, data: bytes, when: int) -> None:
        (rep.root / path).write_bytes(data)
        os.utime(rep.root / path, ns=(when, when))

    write(b, "p", b"X", t)
    write(a, "p", b"Y", t + 10**9)
    sync(a, b)  # a conflict: a's Y wins, b's X is kept as a conflict copy
    first = next(p for p in files(a) if CONFLICT_MARK in p)
    (b.root / first).unlink()
    sync(a, b)  # the copy is removed everywhere: a tombstone on both
    write(a, "p", b"Z", t + 3 * 10**9)  # a edits p ...
    write(b, "p", b"X", t + 2 * 10**9)  # ... and b, concurrently, writes X to p again
    b.scan()
    # X loses again, as another version: its copy gets another name than the first one (whose
    # tombstone, concurrent with it, made the planner skip the copy: X was lost).
    copy = conflict_copy_path("p", b.store.get("p"))
    assert copy != first
    write(b, copy, b"W", t + 2 * 10**9)  # b's record of that path changes after p's
    b.scan()
    (b.root / copy).unlink()
    b.scan()
    # In one pass a plans the copy of X (p's conflict), then b's tombstone of the copy's path; it
    # was planned against the database's record (none): a database-only step buried the new copy.
    sync(a, b)
    rec = a.store.get(copy)
    assert (a.root / copy).read_bytes() == b"X"
    assert rec is not None and not rec.deleted, "the copy is on disk, its record says deleted"
    sync(a, b)
    assert files(a) == files(b) and files(a)[copy] == b"X" and files(a)["p"] == b"Z"
    for rep in (a, b):
        live = {r.path for r in rep.store.iter_paths() if not r.deleted}
        assert live == set(files(rep)), f"{rep.cfg.name}: database and disk differ"


def test_fixed_bug_same_content_merge_diverged_on_mode(replicas):
    """Found by the property test; fixed in reconcile (the winner key orders every field that a
    same-content merge takes its metadata from, and a replica's later change first)."""
    a, b, c, d = replicas(4)
    (a.root / "d").mkdir()
    os.chmod(a.root / "d", 0o755)
    os.symlink(".", b.root / "d")  # concurrently, b makes d a symlink
    sync(a, c)
    sync(b, c)  # a conflict on c: the directory wins, {a:1, b:1}, still "by a", mode 755
    sync(c, b)
    os.chmod(a.root / "d", 0o700)  # {a:2}, by a; a directory's mtime does not change
    sync(d, a)  # d takes a's {a:2}, 700
    sync(c, a)  # c merges {a:2} with its {a:1, b:1}: mtime and replica tie, a's later change wins
    sync(d, b)  # d merges the same two versions: the same outcome
    for _ in range(2):
        for x, y in itertools.combinations((a, b, c, d), 2):
            sync(x, y)
    modes = [stat.S_IMODE(os.lstat(rep.root / "d").st_mode) for rep in (a, b, c, d)]
    assert len(set(modes)) == 1, [oct(m) for m in modes]  # found: 755, 700, 755, 700
    assert modes[0] == 0o700  # a's chmod is the only change there was


def test_fixed_bug_conflict_original_of_a_copy_of_a_copy():
    """Found by the property test; fixed in conflict_copy_path (a copy of an extensionless name
    ends in its mark, which is no extension: the new mark goes after it)."""
    from repld.protocol.record import Record, conflict_copy_path
    from repld.protocol.version import VersionVector

    loser = Record("x", "g", Kind.FILE, VersionVector.of({"b" * 8: 1}), sha256="c" * 64,
                   modified_by="bbbbbbbb-0000")  # fmt: skip
    for path in ("notes", ".bashrc"):
        copy = conflict_copy_path(path, loser)
        copy_of_copy = conflict_copy_path(copy, loser.with_(modified_by="dddddddd-0000"))
        # was "notes.conflict-dddddddd-....conflict-bbbbbbbb-...": the new mark went before the
        # old one (taken for an extension), and conflict_original strips the last.
        assert conflict_original(copy_of_copy) == copy


def test_an_edit_keeping_size_and_mtime_is_seen_by_its_ctime(replicas):
    """Once a known limitation (strict xfail here): change detection was (size, mtime, mode,
    inode) only, so an in-place edit that kept size and mtime (a tool that restores the
    mtime, `cp -p` over the file) was never seen, and a sync overwrote it. The ctime, which
    no program can set back, now says the file was touched since it was last read."""
    a, b = replicas(2)
    f = a.root / "f"
    f.write_bytes(b"version-1")
    sync(a, b)
    st_ = os.stat(f)
    with open(f, "r+b") as fh:  # same size, same inode
        fh.write(b"version-2")
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns))  # mtime as recorded
    (b.root / "f").write_bytes(b"b's edit!")  # b edits too: a conflict, both must be kept
    os.utime(b.root / "f", ns=(st_.st_mtime_ns + 10**9,) * 2)
    for _ in range(2):
        sync(a, b)
    assert b"version-2" in files(a).values()
