#!/usr/bin/env python3
"""Benchmark of continuous sync between two replicas on one machine: Syncthing, rsync, unison and
``repld run``, side by side in one run.

Cases (replica A populated, replica B empty at the start of 1 and 2):

1. initial sync of 10k small files (1-8 KiB of random bytes, ~4.5 KiB on average, ~44 MiB, 100
   per directory in two directory levels) from A to B;
2. initial sync of 8 x 64 MiB files of random bytes;
3. after case 1 converged: 1% of the 10k files (100) rewritten on A with new content of another
   size; the time until B is identical again;
4. change latency: one small file rewritten on A (new content every time) until B's copy has
   that content; B's file is read every ~1 ms; p50 and p95 over 20 writes (plus one unmeasured
   warm-up write that creates the file). Daemons only.

Right before a launch or a one-shot command, every file of A is read once, untimed
(``common.warm_tree``: these virtual machines page out page-cache pages idle for ~2 s).
Daemons (Syncthing, repld) are started on both replicas at once; for case 1 and 2 the time runs
from that launch until B is found identical to A *on disk*: the script never asks the tool
whether it is done. A poll (every 50 ms) stats the files of A that B does not have yet, hashes
each one once it has the right size, and when every file matched, walks all of B: same set of
files (so leftover temporary files count as a difference), and each one unchanged (inode, size,
mtime, ctime) since its content was checked. The time is taken at the end of that walk, so it is
an upper bound that overshoots by at most a poll interval plus one walk (a few tens of ms for
10k files). Case 3 starts its clock before the first of the 100 writes. Cases 3 and 4 run on the
daemons that did case 1, after a settling pause (until both daemons have been nearly idle for 3
seconds). For Syncthing the time from "both devices connected" (the folder is shared in both
configs from the start) until B is identical is shown as well, polled through A's REST API.

One-shot tools (``rsync -a``, ``unison -batch -auto``) do cases 1-3: the time of the command,
after which the script checks B the same way (a difference is reported as a problem). ``cp``
is ``cp -a A/. B/ && sync``: not a sync tool but the disk's limit in the same run (it writes
every byte once and waits until it is on disk), which the large-file case is best read against,
as a ratio: this host's disk speed swings by several times from one hour to the next.

Resources: for a daemon, the peak RSS is ``VmHWM`` from ``/proc/PID/status`` and the CPU time
is utime + stime (+ waited-for children) from ``/proc/PID/stat``, both read right after B was
found identical; before cases 3 and 4 the peak is reset (``echo 5 > /proc/PID/clear_refs``)
and the CPU time counted from that moment, so each case shows its own figures. For a one-shot
command they come from GNU time and ``os.wait4`` as in ``bench_engine.py``.

Syncthing runs headless (``syncthing serve --no-restart``: one process, no monitor), with its
own ``--home``, GUI/REST on a random 127.0.0.1 port with an API key, sync protocol on another
random 127.0.0.1 port, each device given the other's address, global and local discovery, relays,
NAT traversal, usage and crash reporting and upgrades off, no versioning, the watcher on with its
default delay (10 s) for cases 1-3; case 4 is measured with the default delay and again with
``fsWatcherDelayS=1``. Its ``setLowPriority`` option is turned off, since it would make
Syncthing (only) run niced below the script's polling.

repld follows the CLI contract ``init`` / ``id --json`` / ``peer add`` / ``run`` / ``status``:
A is initialized while populated (``init`` scans it, not timed), B empty with A's tree id, each
is given the other as a peer, then both ``repld run`` are launched.

Like ``bench_engine.py`` this runs on a freshly made, journaled ext4 image on a loop device (see
there, and bench/README.md, for why), so it needs root; ``--no-loop DIR`` uses a plain directory.
The table goes to stdout and to ``bench/out/daemon-<timestamp>.md``; every command, the daemons'
output (tails) and the settling and polling details go to the ``.log`` next to it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from common import (
    KIB,
    MIB,
    BenchError,
    Run,
    Runner,
    add_area_options,
    build_large_tree,
    build_small_tree,
    cell,
    command_line,
    drive,
    find_repld,
    flush_fs,
    git_state,
    host_line,
    indent,
    problems_section,
    tail,
    warm_tree,
)

TOOLS = ("syncthing", "rsync", "unison", "cp", "repld")
SMALL_FILES = 10_000
LARGE_COUNT = 8
LARGE_MIB = 64
MODIFIED_FRACTION = 0.01
LATENCY_WRITES = 20
POLL_S = 0.05  # trees
LATENCY_POLL_S = 0.001  # the one file of case 4
INITIAL_TIMEOUT_S = 600.0
MODIFY_TIMEOUT_S = 300.0
LATENCY_TIMEOUT_S = 120.0  # per write
SETTLE_WINDOW_S = 3.0
SETTLE_MAX_S = 30.0
QUIET_CPUS = 0.15  # before each case, wait until the rest of the machine uses less than this
QUIET_MAX_S = 180.0
SETTLE_CPU_FRACTION = 0.03  # "nearly idle": under 3% of one CPU over the window, per daemon
STOP_TIMEOUT_S = 20.0
ST_FOLDER = "bench"
ST_MARKER = ".stfolder"
PROBE = "latency-probe.txt"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- comparing trees on disk --------------------------------------------------------------------

Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def sha256_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def walk_files(root: Path, ignore_top: frozenset[str]) -> dict[str, os.stat_result]:
    """Every non-directory below ``root`` (relative path -> lstat), skipping the top-level names
    in ``ignore_top`` (a tool's own marker)."""
    found: dict[str, os.stat_result] = {}
    stack = [(root, "")]
    while stack:
        path, prefix = stack.pop()
        try:
            entries = list(os.scandir(path))
        except FileNotFoundError:
            continue
        for e in entries:
            if not prefix and e.name in ignore_top:
                continue
            rel = prefix + e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append((Path(e.path), rel + "/"))
                else:
                    found[rel] = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
    return found


def describe(root: Path, ignore_top: frozenset[str] = frozenset()) -> dict[str, tuple[int, bytes]]:
    """relative path -> (size, SHA-256) of every file below ``root``."""
    return {
        rel: (st.st_size, sha256_file(root / rel))
        for rel, st in walk_files(root, ignore_top).items()
    }


def _sig(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Convergence:
    """Whether the tree at ``root`` holds exactly the expected files with the expected content,
    checked cheaply enough to poll while the tools work: a poll stops at the first expected file
    that is not there yet with its size, and content is hashed only once every file is there.
    (Hashing each file as it arrived took CPU from the tools being measured, on 2 cores.)

    ``complete_at`` is the ``perf_counter`` time of the first poll that saw the final state:
    every expected file with its size, no other file, and no file changed (inode, size, mtime,
    ctime) since; the hashes taken afterwards confirm that state's content."""

    def __init__(
        self, root: Path, expected: dict[str, tuple[int, bytes]], ignore_top: frozenset[str]
    ):
        self.root = root
        self.expected = dict(expected)
        self.ignore_top = ignore_top
        self.pending = set(self.expected)
        self.seen: dict[str, Signature] = {}  # there with its size, as first seen so
        self.confirmed: dict[str, Signature] = {}  # content checked, under this signature
        self.since: float | None = None
        self.complete_at: float | None = None
        self.hashed = 0

    def check(self) -> bool:
        changed = False
        for rel in list(self.pending):
            try:
                st = os.lstat(self.root / rel)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != self.expected[rel][0]:
                self.since = None
                return False  # the tool is still at work: look again at the next poll
            self.seen[rel] = _sig(st)
            self.pending.discard(rel)
            changed = True
        walked = walk_files(self.root, self.ignore_top)
        now = time.perf_counter()
        if walked.keys() != self.expected.keys():
            self.since = None
            return False
        for rel, st in walked.items():
            if _sig(st) != self.seen[rel]:
                self.seen[rel] = _sig(st)
                changed = True
        if changed or self.since is None:
            self.since = now
        for rel, sig in self.seen.items():
            if self.confirmed.get(rel) == sig:
                continue
            self.hashed += 1
            size, digest = self.expected[rel]
            try:
                good = sig[1] == size and sha256_file(self.root / rel) == digest
                good = good and _sig(os.lstat(self.root / rel)) == sig
            except FileNotFoundError:
                good = False
            if not good:
                del self.seen[rel]
                self.pending.add(rel)
                self.since = None
                return False
            self.confirmed[rel] = sig
        self.complete_at = self.since
        return True

    def differences(self) -> str:
        seen = walk_files(self.root, self.ignore_top)
        missing = sorted(self.expected.keys() - seen.keys())
        extra = sorted(seen.keys() - self.expected.keys())
        other = sorted(r for r in self.pending if r in seen)

        def some(names: list[str]) -> str:
            return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(self.expected)} files missing ({some(missing)})")
        if extra:
            parts.append(f"{len(extra)} unexpected files ({some(extra)})")
        if other:
            parts.append(f"{len(other)} files with other content ({some(other)})")
        return "; ".join(parts) or "no difference left"


# -- daemons ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStats:
    peak_mib: float
    cpu_s: float


class Daemon:
    """A long-running process we started; only ever signalled by its own PID while we have not
    reaped it (so the PID cannot belong to anything else)."""

    live: list[Daemon] = []

    def __init__(
        self,
        label: str,
        argv: Sequence[str],
        log_path: Path,
        runner: Runner,
        env: dict[str, str] | None = None,
    ):
        self.label = label
        self.log_path = log_path
        self.r = runner
        self.cpu_base = 0.0
        self.peak_reset_ok = True
        shown = " ".join(argv)
        runner.log.write(f"$ {shown} &   # {label}, output in {log_path.name}\n")
        self._out: BinaryIO = open(log_path, "ab")
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        Daemon.live.append(self)
        runner.log.write(f"  {label}: pid {self.proc.pid}\n")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.label} (pid {self.pid}) exited with status "
                f"{self.proc.returncode}:\n{tail(self.output(), 15)}"
            )

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cpu_total(self) -> float:
        text = Path(f"/proc/{self.pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
        return sum(int(x) for x in fields[11:15]) / CLK_TCK

    def peak_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise BenchError(f"{self.label}: no VmHWM in /proc/{self.pid}/status")

    def children(self) -> list[int]:
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return found

    def stats(self) -> ProcStats:
        """Peak RSS since start or the last ``start_case``, CPU time since then."""
        self.check_alive()
        return ProcStats(self.peak_mib(), self.cpu_total() - self.cpu_base)

    def start_case(self) -> None:
        self.check_alive()
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError as e:
            if self.peak_reset_ok:
                self.r.note(
                    f"{self.label}: cannot reset the peak RSS ({e}); peaks are since launch"
                )
            self.peak_reset_ok = False
        self.cpu_base = self.cpu_total()

    def stop(self) -> None:
        if self.alive():
            try:
                peak, cpu = self.peak_mib(), self.cpu_total()
                self.r.log.write(
                    f"  {self.label}: before stopping: VmHWM {peak:.1f} MiB "
                    f"(since last reset), CPU {cpu:.2f} s in all\n"
                )
            except (OSError, BenchError):
                pass
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.r.note(f"{self.label} (pid {self.pid}) ignored SIGTERM; sending SIGKILL")
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        self._out.close()
        if self in Daemon.live:
            Daemon.live.remove(self)
        self.r.log.write(
            f"  {self.label}: exit status {self.proc.returncode}\n"
            + indent("output (tail)", self.output())
        )
        self.r.log.flush()

    @classmethod
    def stop_all(cls) -> None:
        for d in list(cls.live):
            try:
                d.stop()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                print(f"could not stop {d.label} (pid {d.pid}): {e}", file=sys.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str,
    done: Callable[[], bool],
    timeout: float,
    daemons: Sequence[Daemon],
    interval: float,
    explain: Callable[[], str] = lambda: "",
) -> float:
    """Poll ``done`` until it is true; return the ``perf_counter`` time right after it was."""
    deadline = time.perf_counter() + timeout
    checks = 0
    while True:
        if checks % 20 == 0:
            for d in daemons:
                d.check_alive()
        checks += 1
        if done():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            detail = explain()
            raise BenchError(
                f"timeout: {what} not reached after {timeout:.0f} s"
                + (f": {detail}" if detail else "")
            )
        time.sleep(interval)


def settle(
    daemons: Sequence[Daemon], runner: Runner, extra: Callable[[], bool] | None = None
) -> str:
    """Wait until every daemon used under SETTLE_CPU_FRACTION of a CPU over SETTLE_WINDOW_S
    (and ``extra`` holds), at most SETTLE_MAX_S. Returns "" if they settled, else a note that
    says how busy they still were."""
    start = time.perf_counter()
    while True:
        before = [d.cpu_total() for d in daemons]
        time.sleep(SETTLE_WINDOW_S)
        used = [d.cpu_total() - b for d, b in zip(daemons, before, strict=True)]
        quiet = all(u <= SETTLE_CPU_FRACTION * SETTLE_WINDOW_S for u in used)
        if quiet and (extra is None or extra()):
            runner.log.write(f"  settled after {time.perf_counter() - start:.1f} s\n")
            return ""
        if time.perf_counter() - start > SETTLE_MAX_S:
            busy = ", ".join(
                f"{d.label[-1]} {u / SETTLE_WINDOW_S:.0%}"
                for d, u in zip(daemons, used, strict=True)
            )
            runner.note(f"daemons not idle after {SETTLE_MAX_S:.0f} s (CPU: {busy}); going on")
            return f"started without the daemons idle (after {SETTLE_MAX_S:.0f} s: {busy} of a CPU)"
        for d in daemons:
            d.check_alive()


class Foreign:
    """CPU time the machine spent outside this script, its children and its daemons, from
    ``/proc/stat``: other users of the machine, but also kernel threads (such as the loop
    device's and write-back's) working for the tools measured."""

    def __init__(self, daemons: Sequence[Daemon] = ()):
        self.start = time.perf_counter()
        self.busy = _busy_cpu()
        self.own = _own_cpu()
        self.daemons = sum(d.cpu_total() for d in daemons)

    def cpus(self, daemons: Sequence[Daemon] = ()) -> float:
        """Average number of CPUs busy elsewhere since this was made (daemons started since
        then count from zero)."""
        busy = _busy_cpu() - self.busy
        ours = _own_cpu() - self.own + sum(d.cpu_total() for d in daemons) - self.daemons
        return max(0.0, busy - ours) / max(1e-6, time.perf_counter() - self.start)


def _busy_cpu() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def quiet_machine(runner: Runner, daemons: Sequence[Daemon] = ()) -> str:
    """Wait (at most QUIET_MAX_S, which ``--quiet-wait`` sets) until the rest of the machine
    uses under QUIET_CPUS CPUs over a second; "" if it did, else a note."""
    start = time.perf_counter()
    while True:
        probe = Foreign(daemons)
        time.sleep(1.0)
        other = probe.cpus(daemons)
        if other < QUIET_CPUS:
            waited = time.perf_counter() - start
            if waited > 1.5:
                runner.note(f"the machine is quiet again after {waited:.0f} s")
            return ""
        if time.perf_counter() - start > QUIET_MAX_S:
            runner.note(
                f"other processes still use {other:.1f} CPUs after {QUIET_MAX_S:.0f} s; "
                "measuring anyway"
            )
            return f"started while other processes used {other:.1f} CPUs"
        if time.perf_counter() - start < 1.5:
            runner.note(f"other processes use {other:.1f} CPUs; waiting for a quiet machine")


# -- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    tool: str
    seconds: float | None = None
    since_connected: float | None = None
    latency: tuple[float, float] | None = None  # p50, p95 in seconds
    procs: list[tuple[str, ProcStats]] = field(default_factory=list)
    elsewhere: float | None = None  # CPUs busy outside the measured processes, on average
    notes: list[str] = field(default_factory=list)
    failed: str = ""


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    k = (len(s) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# -- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    small: int
    large_count: int
    large_size: int
    modified: int
    latency_writes: int


@dataclass
class Trees:
    small: Path
    large: Path
    small_expected: dict[str, tuple[int, bytes]]
    large_expected: dict[str, tuple[int, bytes]]
    small_mib: float
    modified: list[str]  # relative paths of case 3
    modified_content: dict[str, bytes]

    def after_case3(self) -> dict[str, tuple[int, bytes]]:
        expected = dict(self.small_expected)
        for rel, data in self.modified_content.items():
            expected[rel] = (len(data), hashlib.sha256(data).digest())
        return expected


class Bench:
    def __init__(self, area: Path, args: argparse.Namespace, sizes: Sizes, runner: Runner, fs: str):
        self.area = area
        self.fs = fs
        self.args = args
        self.sizes = sizes
        self.r = runner
        self.rows: list[Row] = []
        self.problems: list[str] = []
        self.trees: Trees | None = None
        self.versions: dict[str, str] = {}

    def render(self) -> str:
        return render(self.args, self.fs, self)

    # -- case names

    def case1(self) -> str:
        t = self.trees
        assert t is not None
        return f"1. initial sync, {len(t.small_expected):,} small files ({t.small_mib:.1f} MiB)"

    def case2(self) -> str:
        return f"2. initial sync, {self.sizes.large_count} x {self.sizes.large_size / MIB:.3g} MiB"

    def case3(self) -> str:
        return f"3. {self.sizes.modified} of the {self.sizes.small:,} files modified on A"

    def case4(self) -> str:
        return f"4. latency, one small file rewritten on A (n={self.sizes.latency_writes})"

    # -- setup

    def build(self) -> None:
        s = self.sizes
        src = self.area / "src"
        self.r.note(f"building {s.small} small files ...")
        small = build_small_tree(src / "small", s.small, self.args.seed)
        self.r.note(f"building {s.large_count} files of {s.large_size / MIB:.3g} MiB ...")
        large = build_large_tree(src / "large", s.large_count, s.large_size, self.args.seed + 1)
        self.r.note("hashing the source trees ...")
        small_expected = describe(small.root)
        large_expected = describe(large.root)
        rng = random.Random(self.args.seed + 2)
        modified = sorted(rng.sample(sorted(small_expected), s.modified))
        content: dict[str, bytes] = {}
        for rel in modified:
            old = small_expected[rel][0]
            size = rng.randint(1 * KIB, 8 * KIB)
            if size == old:
                size += 1
            content[rel] = rng.randbytes(size)
        self.trees = Trees(
            small.root,
            large.root,
            small_expected,
            large_expected,
            small.total_bytes / MIB,
            modified,
            content,
        )
        self.r.note(
            f"trees: {len(small.files)} files / {small.dirs} dirs / {small.total_bytes / MIB:.1f} "
            f"MiB (avg {small.total_bytes / len(small.files) / KIB:.2f} KiB); "
            f"{len(large.files)} x {s.large_size / MIB:.3g} MiB"
        )
        flush_fs()

    def replica_pair(self, tag: str, src: Path) -> tuple[Path, Path, Path]:
        """A fresh copy of ``src`` as replica A, an empty replica B; returns (A, B, base dir)."""
        base = self.area / tag
        if base.exists():
            shutil.rmtree(base)
        base.mkdir()
        a, b = base / "A" / "root", base / "B" / "root"
        a.parent.mkdir()
        b.parent.mkdir()
        self.r.untimed(["cp", "-a", str(src), str(a)])
        b.mkdir()
        return a, b, base

    def drop(self, base: Path) -> None:
        shutil.rmtree(base, ignore_errors=True)
        flush_fs()

    def modify(self, root: Path) -> float:
        """Case 3's writes on replica A; returns the perf_counter time before the first."""
        t = self.trees
        assert t is not None
        start = time.perf_counter()
        for rel in t.modified:
            with open(root / rel, "wb") as f:
                f.write(t.modified_content[rel])
        self.r.log.write(
            f"  {len(t.modified)} files rewritten in "
            f"{(time.perf_counter() - start) * 1000:.1f} ms\n"
        )
        return start

    def converge(
        self,
        what: str,
        b: Path,
        expected: dict[str, tuple[int, bytes]],
        ignore: frozenset[str],
        daemons: Sequence[Daemon],
        timeout: float,
    ) -> float:
        conv = Convergence(b, expected, ignore)
        wait_until(what, conv.check, timeout, daemons, POLL_S, conv.differences)
        self.r.log.write(f"  {what}: identical ({conv.hashed} file hashes while polling)\n")
        assert conv.complete_at is not None
        return conv.complete_at

    def verify(self, row: Row, b: Path, expected: dict[str, tuple[int, bytes]]) -> None:
        conv = Convergence(b, expected, frozenset())
        if not conv.check():
            msg = f"{row.tool}, {row.case}: B differs from A: {conv.differences()}"
            self.problems.append(msg)
            row.notes.append("**B differs from A**")
            self.r.note(msg)

    def latency(
        self, a: Path, b: Path, daemons: Sequence[Daemon], label: str
    ) -> tuple[list[float], list[ProcStats], float]:
        rng = random.Random(self.args.seed + 3)
        src, dst = a / PROBE, b / PROBE
        samples: list[float] = []
        for i in range(self.sizes.latency_writes + 1):  # write 0: creates the file, not measured
            data = f"write {i} ({label})\n".encode() + rng.randbytes(rng.randint(200, 2000))
            if i == 1:
                for d in daemons:
                    d.start_case()
                foreign = Foreign(daemons)
            start = time.perf_counter()
            with open(src, "wb") as f:
                f.write(data)

            def arrived(dst: Path = dst, data: bytes = data) -> bool:
                try:
                    return dst.read_bytes() == data
                except OSError:
                    return False

            done = wait_until(
                f"write {i} of {PROBE} on B", arrived, LATENCY_TIMEOUT_S, daemons, LATENCY_POLL_S
            )
            if i:
                samples.append(done - start)
                self.r.log.write(f"  write {i}: {(done - start) * 1000:.1f} ms\n")
            time.sleep(0.5 + rng.random() * 0.5)
        return samples, [d.stats() for d in daemons], foreign.cpus(daemons)

    def latency_row(
        self,
        tool: str,
        note: str,
        samples: list[float],
        stats: list[ProcStats],
        daemons: Sequence[Daemon],
    ) -> Row:
        row = Row(self.case4(), tool, latency=(percentile(samples, 0.5), percentile(samples, 0.95)))
        row.procs = [(d.label[-1], s) for d, s in zip(daemons, stats, strict=True)]
        row.notes.append(
            f"{note}min {min(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms"
        )
        row.notes.append("RSS/CPU: during the writes")
        return row

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        if row.failed:
            self.r.note(f"{row.tool}: {row.case}: FAILED: {row.failed.splitlines()[0]}")
        elif row.latency:
            self.r.note(
                f"{row.tool}: {row.case}: p50 {row.latency[0]:.3f} s, p95 {row.latency[1]:.3f} s"
            )
        else:
            self.r.note(f"{row.tool}: {row.case}: {row.seconds:.2f} s")
        return row

    def fail(self, tool: str, cases: Sequence[str], error: BenchError) -> None:
        text = str(error)
        self.problems.append(f"{tool}: {text}")
        for n, case in enumerate(cases):
            self.add(Row(case, tool, failed=text if n == 0 else "not run: an earlier step failed"))

    # -- running everything

    def run_all(self) -> None:
        self.build()
        for tool in self.args.tools:
            self.r.note(f"== {tool} ==")
            getattr(self, f"run_{tool}")()
            flush_fs()

    # -- one-shot tools

    def one_shot(
        self,
        tool: str,
        cmd: Callable[[Path, Path], list[str]],
        env: dict[str, str] | None = None,
        before: Callable[[], None] | None = None,
    ) -> None:
        t = self.trees
        assert t is not None

        def pair(tag: str, src: Path) -> tuple[Path, Path, Path]:
            made = self.replica_pair(f"{tool}-{tag}", src)
            if before:
                before()
            return made

        def sync(case: str, a: Path, b: Path, expected: dict[str, tuple[int, bytes]]) -> None:
            flush_fs()
            busy = quiet_machine(self.r)
            warm_tree(a)  # last: see warm_tree
            foreign = Foreign()
            row = self.one_shot_row(case, tool, self.r.run(cmd(a, b), env=env), b, expected)
            row.elsewhere = foreign.cpus()
            row.notes.append(busy)
            if tool == "cp" and case == self.case3():
                row.notes.append("copies every file again")
            if case == self.case2() and row.seconds:
                mib = sum(size for size, _ in expected.values()) / MIB
                row.notes.append(f"{mib / row.seconds:.0f} MiB/s")
            self.add(row)

        cases = [self.case1(), self.case3()]
        try:
            a, b, base = pair("small", t.small)
            sync(cases[0], a, b, t.small_expected)
            cases.pop(0)
            self.modify(a)
            sync(cases[0], a, b, t.after_case3())
            cases.pop(0)
            self.drop(base)
        except BenchError as e:
            self.fail(tool, cases, e)
        try:
            a, b, base = pair("large", t.large)
            sync(self.case2(), a, b, t.large_expected)
            self.drop(base)
        except BenchError as e:
            self.fail(tool, [self.case2()], e)
        self.add(Row(self.case4(), tool, failed="n/a (one-shot)"))

    def one_shot_row(
        self, case: str, tool: str, run: Run, b: Path, expected: dict[str, tuple[int, bytes]]
    ) -> Row:
        row = Row(case, tool, seconds=run.seconds, procs=[("", ProcStats(run.rss_mib, run.cpu_s))])
        self.verify(row, b, expected)
        return row

    def run_rsync(self) -> None:
        self.one_shot("rsync", lambda a, b: ["rsync", "-a", f"{a}/", f"{b}/"])

    def run_cp(self) -> None:
        self.one_shot("cp", lambda a, b: ["sh", "-c", 'cp -a "$1"/. "$2"/ && sync', "cp",
                                          str(a), str(b)])  # fmt: skip

    def run_unison(self) -> None:
        home = self.area / "unison-home"
        env = {**os.environ, "HOME": str(home), "UNISON": str(home / ".unison")}

        def fresh_home() -> None:
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir()

        self.one_shot(
            "unison",
            lambda a, b: ["unison", str(a), str(b), "-batch", "-auto", "-silent"],
            env=env,
            before=fresh_home,
        )

    # -- daemons

    def daemon_session(self, tool: str, start_pair: Callable[[Path, Path, Path], Session]) -> None:
        """Cases 1, 3 and 4 on one pair of daemons, then case 2 on a fresh pair."""
        t = self.trees
        assert t is not None
        cases = [self.case1(), self.case3(), self.case4()]
        session: Session | None = None
        try:
            a, b, base = self.replica_pair(f"{tool}-small", t.small)
            session = start_pair(a, b, base)
            self.initial(tool, session, a, b, t.small_expected, self.case1())
            cases.pop(0)

            unsettled = settle(session.daemons, self.r, session.idle)
            busy = quiet_machine(self.r, session.daemons)
            for d in session.daemons:
                d.start_case()
            foreign = Foreign(session.daemons)
            start = self.modify(a)
            done = self.converge(
                "case 3", b, t.after_case3(), session.ignore, session.daemons, MODIFY_TIMEOUT_S
            )
            row = Row(self.case3(), tool, seconds=done - start, procs=session.stats())
            row.elsewhere = foreign.cpus(session.daemons)
            row.notes.append(
                f"from the first write; watcher delay {session.delay_note}"
                if session.delay_note
                else "from the first write"
            )
            row.notes += [unsettled, busy]
            self.add(row)
            cases.pop(0)

            for setup, note in session.latency_variants():
                setup()
                unsettled = settle(session.daemons, self.r, session.idle)
                busy = quiet_machine(self.r, session.daemons)
                samples, stats, elsewhere = self.latency(a, b, session.daemons, note or tool)
                row = self.latency_row(
                    tool, note + "; " if note else "", samples, stats, session.daemons
                )
                row.elsewhere = elsewhere
                row.notes += [unsettled, busy]
                self.add(row)
            cases.pop(0)
        except BenchError as e:
            self.fail(tool, cases, e)
        finally:
            if session:
                session.stop()
        self.drop(self.area / f"{tool}-small")

        session = None
        try:
            a, b, base = self.replica_pair(f"{tool}-large", t.large)
            session = start_pair(a, b, base)
            self.initial(tool, session, a, b, t.large_expected, self.case2())
        except BenchError as e:
            self.fail(tool, [self.case2()], e)
        finally:
            if session:
                session.stop()
        self.drop(self.area / f"{tool}-large")

    def initial(
        self,
        tool: str,
        session: Session,
        a: Path,
        b: Path,
        expected: dict[str, tuple[int, bytes]],
        case: str,
    ) -> None:
        flush_fs()
        busy = quiet_machine(self.r)
        warm_tree(a)  # last before the launch: see warm_tree (not later: a watcher would hear it)
        foreign = Foreign()
        start = session.launch()
        done = self.converge(case, b, expected, session.ignore, session.daemons, INITIAL_TIMEOUT_S)
        row = Row(case, tool, seconds=done - start, procs=session.stats())
        row.elsewhere = foreign.cpus(session.daemons)
        row.notes.append(busy)
        for d in session.daemons:
            kids = d.children()
            self.r.log.write(f"  {d.label}: pid {d.pid}, child processes: {kids or 'none'}\n")
            if kids:
                row.notes.append(f"{d.label} has child processes {kids}, not counted")
        connected = session.connected_at()
        if connected is not None:
            row.since_connected = done - connected
        if case == self.case2():
            mib = sum(size for size, _ in expected.values()) / MIB
            since = (f", {mib / row.since_connected:.0f} since connected"
                     if row.since_connected else "")  # fmt: skip
            row.notes.append(f"{mib / row.seconds:.0f} MiB/s{since}")
        row.notes.extend(session.notes)
        session.after_initial(row)
        self.add(row)

    def run_syncthing(self) -> None:
        self.daemon_session("syncthing", lambda a, b, base: SyncthingPair(self, a, b, base))

    def run_repld(self) -> None:
        self.daemon_session("repld", lambda a, b, base: RepldPair(self, a, b, base))


class Session:
    """Two daemons on replicas A and B, prepared but not started until ``launch``."""

    ignore: frozenset[str] = frozenset()
    delay_note = ""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.r = bench.r
        self.daemons: list[Daemon] = []
        self.notes: list[str] = []

    def launch(self) -> float:
        raise NotImplementedError

    def connected_at(self) -> float | None:
        return None

    def idle(self) -> bool:
        return True

    def after_initial(self, row: Row) -> None:
        pass

    def latency_variants(self) -> list[tuple[Callable[[], None], str]]:
        return [(lambda: None, "")]

    def stats(self) -> list[tuple[str, ProcStats]]:
        return [(d.label[-1], d.stats()) for d in self.daemons]

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()


class SyncthingPair(Session):
    ignore = frozenset({ST_MARKER})
    delay_note = "10 s (default)"

    def __init__(self, bench: Bench, a: Path, b: Path, base: Path):
        super().__init__(bench)
        self.exe = bench.args.syncthing
        self.sides = {"A": a, "B": b}
        self.homes = {s: base / s / "home" for s in self.sides}
        self.listen = {s: free_port() for s in self.sides}
        self.gui = {s: free_port() for s in self.sides}
        self.key = {s: secrets.token_urlsafe(24) for s in self.sides}
        self.ids: dict[str, str] = {}
        self.connected: float | None = None
        self._stop_watch = threading.Event()
        self._watch: threading.Thread | None = None
        for side, root in self.sides.items():
            (root / ST_MARKER).mkdir(exist_ok=True)
            home = self.homes[side]
            env = self.env(side)
            self.r.untimed([self.exe, "generate", f"--home={home}", "--no-default-folder"], env=env)
            self.ids[side] = self.r.untimed(
                [self.exe, "serve", f"--home={home}", "--device-id"], env=env
            ).strip()
        for side in self.sides:
            self.configure(side)

    def env(self, side: str) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.homes[side]),
            "STNODEFAULTFOLDER": "1",
            "STNORESTART": "1",
            "STNOUPGRADE": "1",
            # Without it `syncthing serve` is a monitor process that runs Syncthing proper as its
            # child (even with --no-restart); with it, the process we start is Syncthing itself.
            "STMONITORED": "1",
        }

    def configure(self, side: str) -> None:
        other = "B" if side == "A" else "A"
        path = self.homes[side] / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        me = root.find("device")
        if me is None or me.get("id") != self.ids[side]:
            raise BenchError(f"{path}: the first <device> is not this device {self.ids[side]}")
        me.set("name", side)
        peer = copy.deepcopy(me)
        peer.set("id", self.ids[other])
        peer.set("name", other)
        _set(peer, "address", f"tcp://127.0.0.1:{self.listen[other]}")
        root.insert(list(root).index(me) + 1, peer)
        gui = _need(root, "gui", path)
        gui.set("tls", "false")
        _set(gui, "address", f"127.0.0.1:{self.gui[side]}")
        _set(gui, "apikey", self.key[side])
        opts = _need(root, "options", path)
        for key, value in {
            "listenAddress": f"tcp://127.0.0.1:{self.listen[side]}",
            "globalAnnounceEnabled": "false",
            "localAnnounceEnabled": "false",
            "relaysEnabled": "false",
            "natEnabled": "false",
            "startBrowser": "false",
            "urAccepted": "-1",
            "crashReportingEnabled": "false",
            "autoUpgradeIntervalH": "0",
            "setLowPriority": "false",
        }.items():
            _set(opts, key, value)
        folder = copy.deepcopy(_need(root, "defaults/folder", path))
        folder.attrib.update(
            {
                "id": ST_FOLDER,
                "label": ST_FOLDER,
                "path": str(self.sides[side]),
                "type": "sendreceive",
                "fsWatcherEnabled": "true",
                "fsWatcherDelayS": "10",
            }
        )
        for dev in folder.findall("device"):
            folder.remove(dev)
        for n, dev_id in enumerate((self.ids[side], self.ids[other])):
            dev = ET.Element("device", {"id": dev_id, "introducedBy": ""})
            ET.SubElement(dev, "encryptionPassword").text = ""
            folder.insert(n, dev)
        versioning = folder.find("versioning")
        if versioning is not None and versioning.get("type"):
            del versioning.attrib["type"]
        root.insert(0, folder)
        tree.write(path)
        self.r.log.write(
            f"  syncthing {side}: device {self.ids[side]}, listen "
            f"127.0.0.1:{self.listen[side]}, GUI 127.0.0.1:{self.gui[side]}\n"
        )

    def api(self, side: str, method: str, path: str, body: Any = None, timeout: float = 5) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.gui[side]}{path}",
            data=data,
            method=method,
            headers={"X-API-Key": self.key[side], "Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def launch(self) -> float:
        start = time.perf_counter()
        for side in self.sides:
            argv = [
                self.exe,
                "serve",
                f"--home={self.homes[side]}",
                "--no-browser",
                "--no-restart",
                "--no-upgrade",
                "--logflags=3",
            ]
            log = self.homes[side].parent / "syncthing.log"
            self.daemons.append(Daemon(f"syncthing {side}", argv, log, self.r, self.env(side)))
        self._watch = threading.Thread(target=self._watch_connection, daemon=True)
        self._watch.start()
        return start

    def _watch_connection(self) -> None:
        peer = self.ids["B"]
        while not self._stop_watch.is_set():
            try:
                conns = self.api("A", "GET", "/rest/system/connections", timeout=2)
                if conns["connections"].get(peer, {}).get("connected"):
                    self.connected = time.perf_counter()
                    return
            except (OSError, ValueError, KeyError):
                pass
            self._stop_watch.wait(0.05)

    def connected_at(self) -> float | None:
        if self._watch is not None:
            self._watch.join(10)
        return self.connected

    def idle(self) -> bool:
        try:
            return all(
                self.api(s, "GET", f"/rest/db/status?folder={ST_FOLDER}")["state"] == "idle"
                for s in self.sides
            )
        except (OSError, ValueError, KeyError):
            return False

    def after_initial(self, row: Row) -> None:
        if row.since_connected is None:
            row.notes.append("connection time unknown")

    def latency_variants(self) -> list[tuple[Callable[[], None], str]]:
        def delay(seconds: int) -> Callable[[], None]:
            def apply() -> None:
                for side in self.sides:
                    self.api(
                        side,
                        "PATCH",
                        f"/rest/config/folders/{ST_FOLDER}",
                        {"fsWatcherDelayS": seconds},
                    )
                    got = self.api(side, "GET", f"/rest/config/folders/{ST_FOLDER}")
                    if got.get("fsWatcherDelayS") != seconds:
                        raise BenchError(
                            f"syncthing {side}: fsWatcherDelayS is "
                            f"{got.get('fsWatcherDelayS')}, not {seconds}"
                        )
                self.r.log.write(f"  syncthing: fsWatcherDelayS set to {seconds} on A and B\n")

            return apply

        return [(lambda: None, "watcher delay 10 s (default)"), (delay(1), "fsWatcherDelayS=1")]

    def stop(self) -> None:
        self._stop_watch.set()
        super().stop()


def _need(root: ET.Element, path: str, where: Path) -> ET.Element:
    found = root.find(path)
    if found is None:
        raise BenchError(f"{where}: no <{path}> element")
    return found


def _set(parent: ET.Element, tag: str, text: str) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = text


class RepldPair(Session):
    def __init__(self, bench: Bench, a: Path, b: Path, base: Path):
        super().__init__(bench)
        self.exe = str(bench.args.repld_path)
        self.cfg = {"A": base / "A" / "config.toml", "B": base / "B" / "config.toml"}
        ports = {"A": free_port(), "B": free_port()}
        listen = {s: f"tcp://127.0.0.1:{p}" for s, p in ports.items()}
        run = self.r.run(
            self.cmd(
                "A",
                "init",
                str(a),
                "--name",
                "a",
                "--listen",
                listen["A"],
                "--state",
                str(base / "A" / "state"),
            )
        )
        self.notes.append(f"`init` of A (scan, not counted): {run.seconds:.2f} s")
        tree_id = _json_str(self.r.untimed(self.cmd("A", "id", "--json")), "tree_id", "A")
        self.r.untimed(
            self.cmd(
                "B",
                "init",
                str(b),
                "--name",
                "b",
                "--listen",
                listen["B"],
                "--state",
                str(base / "B" / "state"),
                "--tree-id",
                tree_id,
            )
        )
        keys = {
            s: _json_str(self.r.untimed(self.cmd(s, "id", "--json")), "public_key", s)
            for s in self.cfg
        }
        self.r.untimed(self.cmd("A", "peer", "add", "b", listen["B"], keys["B"]))
        self.r.untimed(self.cmd("B", "peer", "add", "a", listen["A"], keys["A"]))

    def cmd(self, side: str, *args: str) -> list[str]:
        return [self.exe, "--config", str(self.cfg[side]), *args]

    def launch(self) -> float:
        start = time.perf_counter()
        for side in self.cfg:
            log = self.cfg[side].parent / "repld.log"
            self.daemons.append(Daemon(f"repld {side}", self.cmd(side, "run"), log, self.r))
        self._stop_watch = threading.Event()
        self.connected: float | None = None
        self._watch = threading.Thread(target=self._watch_session, daemon=True)
        self._watch.start()
        return start

    def _watch_session(self) -> None:
        """When B's log first says it is in session with A (the two connected and exchanged
        hellos), as Syncthing's "connected" is taken from its REST API: read every 10 ms."""
        log = self.cfg["B"].parent / "repld.log"
        seen = b""
        with open(log, "rb") as f:
            while not self._stop_watch.is_set():
                seen = seen[-200:] + f.read()
                if b"in session with" in seen:
                    self.connected = time.perf_counter()
                    return
                self._stop_watch.wait(0.01)

    def connected_at(self) -> float | None:
        self._watch.join(10)
        return self.connected

    def stop(self) -> None:
        self._stop_watch.set()
        super().stop()

    def after_initial(self, row: Row) -> None:
        # For the log only: what the daemon says about itself once B was found identical.
        res = subprocess.run(
            self.cmd("A", "status", "--json"), capture_output=True, text=True, timeout=30
        )
        self.r.log.write(
            f"  repld A status --json: exit {res.returncode}\n"
            + indent("stdout", res.stdout)
            + indent("stderr", res.stderr)
        )


def _json_str(text: str, key: str, side: str) -> str:
    try:
        value = json.loads(text)[key]
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"repld {side}: `id --json` has no {key!r}: {e}") from e
    if not isinstance(value, str):
        raise BenchError(f"repld {side}: `id --json` gave a {type(value).__name__} for {key}")
    return value


# -- the report ---------------------------------------------------------------------------------


def table(rows: list[Row], tools: Sequence[str]) -> str:
    out = [
        "| case | tool | seconds | since connected | peak RSS MiB | CPU s | CPUs busy elsewhere "
        "| notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    order = {t: n for n, t in enumerate(tools)}
    cases = sorted({r.case for r in rows})
    for case in cases:
        for row in sorted((r for r in rows if r.case == case), key=lambda r: order[r.tool]):
            if row.failed:
                out.append(
                    f"| {cell(row.case)} | {row.tool} | — | — | — | — | — | "
                    f"{cell(row.failed.splitlines()[0])} |"
                )
                continue
            if row.latency:
                secs = f"p50 {row.latency[0]:.3f}<br>p95 {row.latency[1]:.3f}"
            else:
                secs = f"{row.seconds:.2f}"
            since = f"{row.since_connected:.2f}" if row.since_connected is not None else "—"
            rss = ", ".join(f"{label} {s.peak_mib:.1f}".strip() for label, s in row.procs)
            cpu = ", ".join(f"{label} {s.cpu_s:.2f}".strip() for label, s in row.procs)
            notes = cell("; ".join(n for n in row.notes if n))
            other = f"{row.elsewhere:.2f}" if row.elsewhere is not None else "—"
            out.append(
                f"| {cell(row.case)} | {row.tool} | {secs} | {since} | {rss} | {cpu} | {other} "
                f"| {notes} |"
            )
    return "\n".join(out) + "\n"


def tool_versions(args: argparse.Namespace) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"not runnable ({e})"
        text = (res.stdout or res.stderr).strip()
        return text.splitlines()[0] if text else f"exit {res.returncode}"

    found: dict[str, str] = {}
    for tool in args.tools:
        if tool == "syncthing":
            found[tool] = first_line([args.syncthing, "--version"])
        elif tool == "rsync":
            found[tool] = first_line(["rsync", "--version"])
        elif tool == "unison":
            found[tool] = first_line(["unison", "-version"])
        elif tool == "cp":
            found[tool] = first_line(["cp", "--version"]) + ", then `sync`"
        elif tool == "repld":
            found[tool] = f"`{args.repld_path}`{git_state()}"
    return found


def render(args: argparse.Namespace, fs: str, bench: Bench) -> str:
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    s = bench.sizes
    t = bench.trees
    small = (
        f"{len(t.small_expected):,} files, {t.small_mib:.1f} MiB "
        f"(avg {t.small_mib * MIB / len(t.small_expected) / KIB:.2f} KiB)"
        if t
        else f"{s.small:,} files"
    )
    lines = [
        f"# repld daemon benchmark: continuous sync, {now}",
        "",
        f"- command: `{command_line()}`",
        *(f"- {tool}: {v}" for tool, v in bench.versions.items()),
        f"- file system: {fs}",
        f"- host: {host_line()}",
        f"- sizes: scale {args.scale:g}; small tree {small}; {s.large_count} x "
        f"{s.large_size / MIB:.3g} MiB; {s.modified} files modified; {s.latency_writes} latency "
        f"writes",
        "- seconds: daemons from launching both (cases 1, 2) or from the first write (case 3) "
        f"until the first poll (every {POLL_S * 1000:.0f} ms) that found B with every file in "
        "place, its content checked by hashing after that poll; case 4 "
        f"from the write until B's file had the new content (polled every "
        f"{LATENCY_POLL_S * 1000:g} ms); one-shot tools: the command; hot cache, `sync` before "
        "each case",
        "- since connected: Syncthing only, from both devices connected (folder shared in both "
        "configs from the start) until identical",
        "- CPUs busy elsewhere: average CPU use outside the measured processes and this script "
        "during the case (other users of the machine, and kernel threads such as the loop "
        f"device's); each case waits (at most {QUIET_MAX_S:.0f} s) until it is under "
        f"{QUIET_CPUS:g} over a second",
        "- peak RSS / CPU: daemons per process (A, B) from /proc (VmHWM, utime+stime), reset at "
        "the start of cases 3 and 4; one-shot tools the command and its descendants (GNU time "
        "%M, wait4)",
        "",
    ]
    report = "\n".join(lines) + "\n" + table(bench.rows, args.tools)
    return report + problems_section(bench.problems)


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Run as root (for the loop device): sudo .venv/bin/python bench/bench_daemon.py",
    )
    p.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help=f"comma-separated subset of {','.join(TOOLS)} (default: all)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the file count and of the large file size, for a quick "
        "check (e.g. 0.1); also cuts the latency writes to 5",
    )
    p.add_argument(
        "--latency-writes",
        type=int,
        help=f"measured writes in case 4 (default {LATENCY_WRITES}, 5 with --scale < 1)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=QUIET_MAX_S,
        help="before each case, wait at most this many seconds for the rest of the machine to be "
        f"quiet (default {QUIET_MAX_S:g}; 0: do not wait)",
    )
    p.add_argument("--syncthing", default="syncthing", help="the syncthing executable")
    add_area_options(p)
    args = p.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        p.error(
            f"--tools: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(TOOLS)}"
        )
    args.tools = list(dict.fromkeys(tools))
    if not 0 < args.scale <= 1:
        p.error("--scale must be in (0, 1]")
    if args.latency_writes is None:
        args.latency_writes = LATENCY_WRITES if args.scale >= 1 else 5
    if args.latency_writes < 1:
        p.error("--latency-writes must be at least 1")
    return args


def check_tools(args: argparse.Namespace) -> None:
    for tool, exe in (("syncthing", args.syncthing), ("rsync", "rsync"), ("unison", "unison")):
        if tool in args.tools and shutil.which(exe) is None:
            raise BenchError(f"{exe} not found (apt-get install -y {tool})")
    args.repld_path = find_repld(args.repld) if "repld" in args.tools else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    global QUIET_MAX_S
    QUIET_MAX_S = args.quiet_wait
    small = max(100, round(SMALL_FILES * args.scale))
    sizes = Sizes(
        small=small,
        large_count=LARGE_COUNT,
        large_size=max(KIB, int(LARGE_MIB * MIB * args.scale) // KIB * KIB),
        modified=max(1, round(small * MODIFIED_FRACTION)),
        latency_writes=args.latency_writes,
    )

    def make(area: Path, fs: str, runner: Runner) -> Bench:
        check_tools(args)
        bench = Bench(area, args, sizes, runner, fs)
        bench.versions = tool_versions(args)
        return bench

    return drive("daemon", args, make, Daemon.stop_all)


if __name__ == "__main__":
    sys.exit(main())
