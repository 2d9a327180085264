#!/usr/bin/env python3
"""Benchmark of repld's replica engine against the usual tools, in one run.

What it measures (wall time with ``time.perf_counter`` and the peak RSS of the child process and
its descendants, from ``os.wait4``):

a. ``repld init`` of a 100k-file tree (the first scan hashes every file) against
   ``find -type f -print0 | xargs -0 sha256sum`` on the same tree; the target is within 2x.
b. ``repld scan`` of that tree with nothing changed; the target is under 2 s. For scale,
   ``find -printf`` that stats every file is shown too.
c. ``repld scan`` after 1% of the files were touched (half of them also appended to).
d. A one-shot ``repld sync`` of a 10k-file tree into an empty replica against ``cp -a``,
   ``cp -a && sync``, ``rsync -a`` and a first ``unison`` run, each into a fresh empty directory;
   then the same for a tree of a few 64 MiB files against ``cp -a && sync`` and ``rsync -a``.
   Ratios are against rsync. repld flushes the file system (syncfs) before it records what it
   wrote, so ``cp -a && sync`` is its like-for-like comparison; ``cp -a`` and ``rsync -a`` only
   fill the page cache.

Everything runs hot: the trees were just written, and ``sync`` runs before every measurement
(plus after deleting the previous tool's target) so one run's write-back does not land in the
next one's timing.

Why a loop device: the root file system of the machines this was written on is ext4 *without a
journal*; there, creating many files after deleting many is ~10x slower and erratic, which would
measure the file system rather than the tools. So by default the script makes a sparse image file,
formats it as ordinary journaled ext4 (``mkfs.ext4``'s defaults), loop-mounts it and runs
everything inside (configs and databases too); it unmounts and deletes it at the end. This needs
root. ``--no-loop DIR`` runs in a plain directory instead (no root needed).

The table goes to stdout and to ``bench/out/engine-<timestamp>.md``; every command run, its exit
status and the tail of its output go to the ``.log`` file next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

SCAN_TARGET_S = 2.0
INIT_TARGET_RATIO = 2.0


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    seconds: float
    rss_mib: float
    stdout: str


@dataclass
class Row:
    case: str
    tool: str
    seconds: float
    rss_mib: float
    reference: bool = False
    notes: list[str] = field(default_factory=list)
    stdout: str = field(default="", repr=False)


class Runner:
    """Runs commands, timed, with their output in a log file.

    The peak RSS comes from ``os.wait4``'s rusage, which on Linux covers the child and every
    descendant it waited for (so ``sh -c 'a | b'`` reports the largest of sh, a and b). But the
    kernel also folds the RSS of the memory image a process had *before* its exec into that
    figure, and a child forked from this Python process starts with this process's memory (tens
    of MiB once the trees are built). So the command is started through GNU time (``time -f %M``),
    a ~1 MiB process, and its figure for the real command is used; ``os.wait4`` still reaps it.
    Without GNU time the wait4 figure is used, which is only an upper bound.
    """

    def __init__(self, log: TextIO, scratch: Path):
        self.log = log
        self.scratch = scratch
        self.count = 0
        found = shutil.which("time", path="/usr/bin:/bin:/usr/local/bin")
        self.gnu_time = found if found and _is_gnu_time(found) else None

    def note(self, text: str) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp}] {text}", file=sys.stderr, flush=True)
        self.log.write(f"[{stamp}] {text}\n")
        self.log.flush()

    def run(self, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> Run:
        """Run ``cmd`` to completion; raise BenchError unless it exits 0."""
        self.count += 1
        out_path = self.scratch / f"run{self.count:03d}.out"
        err_path = self.scratch / f"run{self.count:03d}.err"
        rss_path = self.scratch / f"run{self.count:03d}.rss"
        shown = " ".join(shlex.quote(c) for c in cmd)
        self.log.write(f"$ {shown}\n")
        argv = list(cmd)
        if self.gnu_time:
            argv = [self.gnu_time, "-q", "-f", "%M", "-o", str(rss_path), *argv]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout = out_path.read_text(errors="replace")
        stderr = err_path.read_text(errors="replace")
        rss_kib = usage.ru_maxrss  # KiB on Linux
        if self.gnu_time:
            rss_kib = int(rss_path.read_text().split()[-1])
            rss_path.unlink()
        out_path.unlink()
        err_path.unlink()
        rss_mib = rss_kib / 1024
        self.log.write(
            f"  exit {proc.returncode}, {seconds:.3f} s, peak RSS {rss_mib:.1f} MiB\n"
            + _indent("stdout", stdout)
            + _indent("stderr", stderr)
        )
        self.log.flush()
        if proc.returncode != 0:
            raise BenchError(
                f"command failed with exit {proc.returncode}: {shown}\n{_tail(stderr or stdout)}"
            )
        return Run(seconds, rss_mib, stdout)

    def shell(self, script: str) -> Run:
        return self.run(["sh", "-c", script])

    def untimed(self, cmd: Sequence[str]) -> str:
        return self.run(cmd).stdout


def _is_gnu_time(path: str) -> bool:
    res = subprocess.run([path, "--version"], capture_output=True, text=True)
    return "GNU" in res.stdout + res.stderr


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _indent(label: str, text: str) -> str:
    if not text.strip():
        return ""
    return f"  {label}:\n" + "".join(f"    {line}\n" for line in _tail(text, 40).splitlines())


def flush_fs() -> None:
    subprocess.run(["sync"], check=True)


def q(path: Path | str) -> str:
    return shlex.quote(str(path))


# -- the work area: a loop-mounted journaled ext4 image, or a plain directory -------------------


@contextmanager
def loop_mounted_ext4(workdir: Path, size: int, log: Runner) -> Iterator[Path]:
    if os.geteuid() != 0:
        raise BenchError("the loop device needs root; run as root or use --no-loop DIR")
    base = Path(tempfile.mkdtemp(prefix="repld-bench-", dir=workdir))
    image = base / "ext4.img"
    mnt = base / "mnt"
    mounted = False
    try:
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(size)  # sparse
        log.untimed(["mkfs.ext4", "-q", "-F", str(image)])
        log.untimed(["mount", "-o", "loop", str(image), str(mnt)])
        mounted = True
        log.note(f"journaled ext4 image {image} ({size / GIB:.1f} GiB, sparse) mounted on {mnt}")
        yield mnt
    finally:
        if mounted:
            _unmount(mnt, log)
        shutil.rmtree(base, ignore_errors=True)


def _unmount(mnt: Path, log: Runner) -> None:
    flush_fs()
    for attempt in range(5):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.5 * (attempt + 1))
    log.note(f"{mnt} is busy; unmounting lazily")
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@contextmanager
def plain_directory(parent: Path, log: Runner) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="repld-bench-", dir=parent))
    try:
        log.note(f"working in plain directory {base} (no loop device)")
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- building the trees -------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeInfo:
    root: Path
    files: list[Path]
    total_bytes: int
    dirs: int


def build_small_tree(root: Path, nfiles: int, seed: int) -> TreeInfo:
    """``nfiles`` files of 1-8 KiB of random bytes, 100 per directory, two directory levels
    (groups of 10 directories), all from a fixed seed."""
    rng = random.Random(seed)
    ndirs = max(1, nfiles // 100)
    dirs = [root / f"d{i // 10:03d}" / f"s{i % 10}" for i in range(ndirs)]
    for d in dirs:
        d.mkdir(parents=True)
    files: list[Path] = []
    total = 0
    for i in range(nfiles):
        size = rng.randint(1 * KIB, 8 * KIB)
        path = dirs[i % ndirs] / f"f{i:06d}.dat"
        path.write_bytes(rng.randbytes(size))
        files.append(path)
        total += size
    return TreeInfo(root, files, total, ndirs)


def build_large_tree(root: Path, count: int, size: int, seed: int) -> TreeInfo:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    files: list[Path] = []
    for i in range(count):
        path = root / f"large{i:02d}.bin"
        with open(path, "wb") as f:
            left = size
            while left:
                chunk = min(left, 8 * MIB)
                f.write(rng.randbytes(chunk))
                left -= chunk
        files.append(path)
    return TreeInfo(root, files, count * size, 1)


def change_some(tree: TreeInfo, fraction: float, seed: int) -> tuple[int, int]:
    """Touch ``fraction`` of the files (mtime +10 s); append a line to half of them.
    Returns (touched only, appended)."""
    rng = random.Random(seed)
    chosen = rng.sample(tree.files, max(1, round(len(tree.files) * fraction)))
    appended = 0
    for n, path in enumerate(chosen):
        if n % 2 == 0:
            with open(path, "ab") as f:
                f.write(b"appended by bench_engine\n")
            appended += 1
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    return len(chosen) - appended, appended


# -- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    small: int  # files in the tree that is synced
    big: int  # files in the tree that is scanned
    large_count: int
    large_size: int


class Bench:
    def __init__(self, area: Path, repld: Path, sizes: Sizes, seed: int, runner: Runner):
        self.area = area
        self.repld = repld
        self.sizes = sizes
        self.seed = seed
        self.r = runner
        self.rows: list[Row] = []
        self.problems: list[str] = []
        self.cfg_dir = area / "cfg"
        self.targets = area / "targets"
        self.cfg_dir.mkdir()
        self.targets.mkdir()

    # -- helpers

    def repld_cmd(self, config: Path, *args: str) -> list[str]:
        return [str(self.repld), "--config", str(config), *args]

    def measure(self, case: str, tool: str, cmd: Sequence[str], *, reference: bool = False,
                env: dict[str, str] | None = None) -> Row:  # fmt: skip
        flush_fs()
        self.r.note(f"{case}: {tool} ...")
        run = self.r.run(cmd, env=env)
        row = Row(case, tool, run.seconds, run.rss_mib, reference, stdout=run.stdout)
        self.rows.append(row)
        self.r.note(f"{case}: {tool}: {run.seconds:.2f} s, {run.rss_mib:.1f} MiB")
        return row

    def fresh_target(self, name: str) -> Path:
        """Delete every old target (and its flush), then return a path that does not exist."""
        for old in self.targets.iterdir():
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        flush_fs()
        return self.targets / name

    def verify(self, src: Path, dst: Path, tool: str, row: Row) -> None:
        res = subprocess.run(["diff", "-rq", str(src), str(dst)], capture_output=True, text=True)
        if res.returncode != 0:
            msg = f"{tool}: target differs from source:\n{_tail(res.stdout + res.stderr, 10)}"
            self.problems.append(msg)
            row.notes.append("**copy differs from source**")
            self.r.note(msg)

    def warm(self, tree: Path) -> None:
        """An untimed read of every file, so every tool starts from the same hot cache."""
        self.r.shell(f"find {q(tree)} -type f -print0 | xargs -0 cat > /dev/null")

    # -- cases

    def run_all(self) -> None:
        s = self.sizes
        src = self.area / "src"
        self.r.note(f"building {s.big} small files ...")
        big = build_small_tree(src / "tree100k", s.big, self.seed)
        self.r.note(f"building {s.small} small files ...")
        small = build_small_tree(src / "tree10k", s.small, self.seed + 1)
        self.r.note(f"building {s.large_count} files of {s.large_size / MIB:g} MiB ...")
        large = build_large_tree(src / "large", s.large_count, s.large_size, self.seed + 2)
        flush_fs()
        self.r.note(
            f"trees: {len(big.files)} files / {big.dirs} dirs / {big.total_bytes / MIB:.1f} MiB; "
            f"{len(small.files)} files / {small.dirs} dirs / {small.total_bytes / MIB:.1f} MiB; "
            f"{len(large.files)} x {s.large_size / MIB:g} MiB"
        )
        self.case_init_and_scan(big)
        self.case_sync_small(small)
        self.case_sync_large(large)

    def case_init_and_scan(self, tree: TreeInfo) -> None:
        n = len(tree.files)
        label = _count(n)
        self.warm(tree.root)
        case = f"a. first scan, {label} files"
        ref = self.measure(case, "find | xargs sha256sum",
                           ["sh", "-c", f"find {q(tree.root)} -type f -print0 "
                                        f"| xargs -0 sha256sum > /dev/null"],
                           reference=True)  # fmt: skip
        config = self.cfg_dir / "scan.toml"
        row = self.measure(case, "repld init", self.repld_cmd(config, "init", str(tree.root),
                                                              "--name", "scan"))  # fmt: skip
        ratio = row.seconds / ref.seconds
        row.notes.append(f"{n / row.seconds:,.0f} files/s; target <= {INIT_TARGET_RATIO:g}x: "
                         + ("met" if ratio <= INIT_TARGET_RATIO else "**missed**"))  # fmt: skip

        case = f"b. rescan, nothing changed, {label} files"
        self.measure(case, "find -printf (stat each)",
                     ["sh", "-c", f"find {q(tree.root)} -printf '%s %T@\\n' > /dev/null"],
                     reference=True)  # fmt: skip
        row = self.measure(case, "repld scan", self.repld_cmd(config, "scan"))
        events = _summary(row.stdout)
        row.notes.append(f"target < {SCAN_TARGET_S:g} s: "
                         + ("met" if row.seconds < SCAN_TARGET_S else "**missed**"))  # fmt: skip
        if events and not events.endswith(": 0 created, 0 updated, 0 deleted (0 B hashed)"):
            self.problems.append(f"scan of an unchanged tree recorded changes: {events}")
            row.notes.append(f"**{events}**")

        touched, appended = change_some(tree, 0.01, self.seed + 3)
        case = f"c. rescan, 1% changed ({touched} touched, {appended} appended)"
        row = self.measure(case, "repld scan", self.repld_cmd(config, "scan"))
        row.notes.append(_summary(row.stdout))

    def sync_repld(self, case: str, tree: TreeInfo, tag: str) -> Row:
        """Replica A on ``tree``, replica B on a fresh empty directory; time A's sync into B."""
        a_cfg = self.cfg_dir / f"{tag}-a.toml"
        b_cfg = self.cfg_dir / f"{tag}-b.toml"
        self.r.untimed(self.repld_cmd(a_cfg, "init", str(tree.root), "--name", "a"))
        tree_id = _json_field(self.r.untimed(self.repld_cmd(a_cfg, "id", "--json")), "tree_id")
        dst = self.fresh_target(f"repld-{tag}")
        dst.mkdir()
        self.r.untimed(self.repld_cmd(b_cfg, "init", str(dst), "--name", "b",
                                      "--tree-id", tree_id))  # fmt: skip
        row = self.measure(case, "repld sync", self.repld_cmd(a_cfg, "sync", str(b_cfg)))
        self.verify(tree.root, dst, "repld sync", row)
        # A second sync with nothing to do: cheap, and worth knowing.
        again = self.measure(f"{case} (again, nothing to do)", "repld sync",
                             self.repld_cmd(a_cfg, "sync", str(b_cfg)))  # fmt: skip
        again.notes.append("both sides rescanned")
        return row

    def compare(self, case: str, tree: TreeInfo, tool: str, script: str, dst: Path, *,
                reference: bool = False, env: dict[str, str] | None = None) -> Row:  # fmt: skip
        row = self.measure(case, tool, ["sh", "-c", script], reference=reference, env=env)
        self.verify(tree.root, dst, tool, row)
        return row

    def case_sync_small(self, tree: TreeInfo) -> None:
        case = f"d. sync {_count(len(tree.files))} files into empty replica"
        self.warm(tree.root)
        rows = [self.sync_repld(case, tree, "small")]
        src = tree.root
        dst = self.fresh_target("cp")
        rows.append(self.compare(case, tree, "cp -a", f"cp -a {q(src)} {q(dst)}", dst))
        dst = self.fresh_target("cp-sync")
        rows.append(self.compare(case, tree, "cp -a && sync",
                                 f"cp -a {q(src)} {q(dst)} && sync", dst))  # fmt: skip
        dst = self.fresh_target("rsync")
        rows.append(self.compare(case, tree, "rsync -a", f"rsync -a {q(src)}/ {q(dst)}/", dst,
                                 reference=True))  # fmt: skip
        dst = self.fresh_target("unison")
        dst.mkdir()
        home = self.area / "unison-home"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "UNISON": str(home / ".unison")}
        rows.append(self.compare(case, tree, "unison (first run)",
                                 f"unison {q(src)} {q(dst)} -batch -auto -silent", dst,
                                 env=env))  # fmt: skip
        for row in rows:
            row.notes.append(f"{len(tree.files) / row.seconds:,.0f} files/s")
        self.fresh_target("none")

    def case_sync_large(self, tree: TreeInfo) -> None:
        s = self.sizes
        case = f"e. sync {s.large_count} x {s.large_size / MIB:g} MiB into empty replica"
        self.warm(tree.root)
        rows = [self.sync_repld(case, tree, "large")]
        src = tree.root
        dst = self.fresh_target("cp-sync")
        rows.append(self.compare(case, tree, "cp -a && sync",
                                 f"cp -a {q(src)} {q(dst)} && sync", dst))  # fmt: skip
        dst = self.fresh_target("rsync")
        rows.append(self.compare(case, tree, "rsync -a", f"rsync -a {q(src)}/ {q(dst)}/", dst,
                                 reference=True))  # fmt: skip
        for row in rows:
            row.notes.append(f"{tree.total_bytes / MIB / row.seconds:,.0f} MiB/s")
        self.fresh_target("none")


def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _summary(stdout: str) -> str:
    """The last line of a repld scan's output: 'NAME: N created, N updated, N deleted (...)'."""
    lines = stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _json_field(text: str, key: str) -> str:
    value = json.loads(text)[key]
    if not isinstance(value, str):
        raise BenchError(f"`repld id --json` gave a {type(value).__name__} for {key}")
    return value


# -- the report ---------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    refs: dict[str, Row] = {}
    for row in rows:
        if row.reference:
            refs[row.case] = row
    out = [
        "| case | tool | seconds | peak RSS MiB | ratio vs reference | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ref = refs.get(row.case)
        if row.reference:
            ratio = "1.00 (ref)"
        elif ref is not None:
            ratio = f"{row.seconds / ref.seconds:.2f}"
        else:
            ratio = "—"
        notes = _cell("; ".join(n for n in row.notes if n))
        case, tool = _cell(row.case), _cell(row.tool)
        out.append(f"| {case} | {tool} | {row.seconds:.2f} | {row.rss_mib:.1f} | "
                   f"{ratio} | {notes} |")  # fmt: skip
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _git_state() -> str:
    """The commit of the checkout this script is in, and whether it has uncommitted changes."""

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(BENCH_DIR), *args], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return ""
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f", checkout at {head}" + (" with uncommitted changes" if dirty else "")


def header(args: argparse.Namespace, repld: Path, fs: str, runner: Runner) -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return (
        f"# repld engine benchmark, {now}\n\n"
        f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`\n"
        f"- repld: `{repld}`{_git_state()}\n"
        f"- file system: {fs}\n"
        f"- host: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu}), "
        f"Python {platform.python_version()}\n"
        f"- sizes: {'--quick (1/10)' if args.quick else 'full'}; hot cache; `sync` before each "
        f"measurement; one run per row\n"
        f"- peak RSS: "
        + (
            "the command and its descendants, measured by GNU time (%M) around it\n"
            if runner.gnu_time
            else "os.wait4 rusage (no GNU time): includes this script's own RSS, an upper bound\n"
        )
    )


# -- command line -------------------------------------------------------------------------------


def find_repld(given: Path | None) -> Path:
    if given is not None:
        if not os.access(given, os.X_OK):
            raise BenchError(f"--repld {given}: not an executable file")
        return given.absolute()
    beside = Path(sys.executable).parent / "repld"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("repld")
    if found is None:
        raise BenchError("no repld next to this Python or on PATH; pass --repld PATH")
    return Path(found)


def parse_size(text: str) -> int:
    units = {"K": KIB, "M": MIB, "G": GIB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Run as root (for the loop device): sudo .venv/bin/python bench/bench_engine.py",
    )
    p.add_argument("--quick", action="store_true",
                   help="1/10 of every size (1k/10k small files, 6.4 MiB large files)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the image file goes (default /var/tmp)")  # fmt: skip
    p.add_argument("--image-size", type=parse_size, default=8 * GIB,
                   help="size of the sparse ext4 image (default 8G)")  # fmt: skip
    p.add_argument("--no-loop", type=Path, metavar="DIR",
                   help="run in a temporary directory under DIR, no loop device")  # fmt: skip
    p.add_argument("--large-count", type=int, default=4, help="number of large files (default 4)")
    p.add_argument("--large-mib", type=float, default=64, help="size of each large file (64)")
    p.add_argument("--repld", type=Path, help="the repld executable (default: next to "
                   "this Python, else on PATH)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="random seed for the trees (default 1)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and kill both unwind through the finally blocks: the image is unmounted and deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scale = 10 if args.quick else 1
    sizes = Sizes(
        small=10_000 // scale,
        big=100_000 // scale,
        large_count=args.large_count,
        large_size=int(args.large_mib * MIB / scale),
    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    md_path = OUT_DIR / f"engine-{stamp}.md"
    log_path = md_path.with_suffix(".log")
    report = ""
    status = 0
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="repld-bench-") as scratch:
        runner = Runner(log, Path(scratch))
        try:
            repld = find_repld(args.repld)
            if args.no_loop is not None:
                area_cm = plain_directory(args.no_loop, runner)
                fs = f"plain directory under {args.no_loop} (no loop device)"
            else:
                area_cm = loop_mounted_ext4(args.workdir, args.image_size, runner)
                fs = (f"journaled ext4 (mkfs.ext4 defaults) on a loop device, sparse "
                      f"{args.image_size / GIB:g} GiB image in {args.workdir}")  # fmt: skip
            with area_cm as area:
                bench = Bench(area, repld, sizes, args.seed, runner)
                try:
                    bench.run_all()
                except BenchError as e:
                    bench.problems.append(f"benchmark stopped: {e}")
                    raise
                finally:
                    report = render(args, repld, fs, bench)
                    md_path.write_text(report)
        except BenchError as e:
            runner.note(f"error: {e}")
            status = 1
    if report:
        print(report)
        print(f"written to {md_path}", file=sys.stderr)
    print(f"commands and their output: {log_path}", file=sys.stderr)
    return status


def render(args: argparse.Namespace, repld: Path, fs: str, bench: Bench) -> str:
    report = header(args, repld, fs, bench.r) + "\n" + table(bench.rows)
    if bench.problems:
        report += "\nProblems:\n\n" + "".join(
            f"- {p.replace(chr(10), chr(10) + '  ')}\n" for p in bench.problems
        )
    return report


if __name__ == "__main__":
    sys.exit(main())
