"""What the benchmarks in this directory share: running and timing commands with a log, the
loop-mounted journaled ext4 work area, the test trees, and bits of the report.

Imported as ``common`` by the scripts next to it (``python bench/bench_X.py`` puts this directory
first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    seconds: float
    rss_mib: float
    stdout: str
    cpu_s: float = 0.0  # user + system of the command and the descendants it waited for


class Runner:
    """Runs commands, timed, with their output in a log file.

    The peak RSS comes from ``os.wait4``'s rusage, which on Linux covers the child and every
    descendant it waited for (so ``sh -c 'a | b'`` reports the largest of sh, a and b). But the
    kernel also folds the RSS of the memory image a process had *before* its exec into that
    figure, and a child forked from this Python process starts with this process's memory (tens
    of MiB once the trees are built). So the command is started through GNU time (``time -f %M``),
    a ~1 MiB process, and its figure for the real command is used; ``os.wait4`` still reaps it.
    Without GNU time the wait4 figure is used, which is only an upper bound. The CPU time
    (user + system) is wait4's, which covers the command and its descendants (GNU time's own
    share is negligible).
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
        if self.gnu_time and rss_path.exists():
            rss_kib = int(rss_path.read_text().split()[-1])
            rss_path.unlink()
        out_path.unlink()
        err_path.unlink()
        rss_mib = rss_kib / 1024
        cpu_s = usage.ru_utime + usage.ru_stime
        self.log.write(
            f"  exit {proc.returncode}, {seconds:.3f} s, peak RSS {rss_mib:.1f} MiB, "
            f"CPU {cpu_s:.2f} s\n" + indent("stdout", stdout) + indent("stderr", stderr)
        )
        self.log.flush()
        if proc.returncode != 0:
            raise BenchError(
                f"command failed with exit {proc.returncode}: {shown}\n{tail(stderr or stdout)}"
            )
        return Run(seconds, rss_mib, stdout, cpu_s)

    def shell(self, script: str) -> Run:
        return self.run(["sh", "-c", script])

    def untimed(self, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> str:
        return self.run(cmd, env=env).stdout


def _is_gnu_time(path: str) -> bool:
    res = subprocess.run([path, "--version"], capture_output=True, text=True)
    return "GNU" in res.stdout + res.stderr


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def indent(label: str, text: str) -> str:
    if not text.strip():
        return ""
    return f"  {label}:\n" + "".join(f"    {line}\n" for line in tail(text, 40).splitlines())


def flush_fs() -> None:
    subprocess.run(["sync"], check=True)


def warm_tree(root: Path) -> None:
    """Read every file below ``root`` once, so that the command timed next finds it in the page
    cache. Call it right before that command: the virtual machines this was written on page out
    page-cache pages left untouched for about two seconds (DAMON proactive reclaim), so a tree
    written or read a little earlier is already half cold again."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue  # a symlink, a FIFO, or gone: nothing to warm
            try:
                while os.read(fd, 1 << 20):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)


def q(path: Path | str) -> str:
    return shlex.quote(str(path))


# -- the work area: a loop-mounted journaled ext4 image, or a plain directory -------------------


@contextmanager
def loop_mounted_ext4(
    workdir: Path, size: int, log: Runner, *, sparse: bool = False
) -> Iterator[Path]:
    """A journaled ext4 on a loop device over an image file of ``size`` bytes in ``workdir``.

    The image is written through with zeros first, unless ``sparse``: in a sparse image, the
    first write to each of its blocks also makes the host file system allocate it, and that
    cost fell on whichever tool wrote first into never-used space (the first copy of a series
    ran at half the speed of the next ones, whatever the tool)."""
    if os.geteuid() != 0:
        raise BenchError("the loop device needs root; run as root or use --no-loop DIR")
    base = Path(tempfile.mkdtemp(prefix="repld-bench-", dir=workdir))
    image = base / "ext4.img"
    mnt = base / "mnt"
    mounted = False
    try:
        mnt.mkdir()
        with open(image, "wb") as f:
            if sparse:
                f.truncate(size)
            else:
                log.note(f"writing {size / GIB:.1f} GiB of zeros to {image} "
                         "(--sparse-image skips it)")  # fmt: skip
                zeros = bytes(16 * MIB)
                for _ in range(size // len(zeros)):
                    f.write(zeros)
                f.write(zeros[: size % len(zeros)])
                f.flush()
                os.fsync(f.fileno())
        log.untimed(["mkfs.ext4", "-q", "-F", str(image)])
        log.untimed(["mount", "-o", "loop", str(image), str(mnt)])
        mounted = True
        kind = "sparse" if sparse else "written through"
        log.note(f"journaled ext4 image {image} ({size / GIB:.1f} GiB, {kind}) mounted on {mnt}")
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


def work_area(
    no_loop: Path | None, workdir: Path, image_size: int, log: Runner, *, sparse: bool = False
) -> tuple[AbstractContextManager[Path], str]:
    """The context manager that makes the work area, and how the report describes it."""
    if no_loop is not None:
        return plain_directory(no_loop, log), f"plain directory under {no_loop} (no loop device)"
    return loop_mounted_ext4(workdir, image_size, log, sparse=sparse), (
        f"journaled ext4 (mkfs.ext4 defaults) on a loop device, "
        f"{'sparse' if sparse else 'written-through'} {image_size / GIB:g} GiB image in {workdir}"
    )


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


# -- the report ---------------------------------------------------------------------------------


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def git_state() -> str:
    """The commit of the checkout this script is in, and whether it has uncommitted changes."""

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(BENCH_DIR), *args], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return ""
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f", checkout at {head}" + (" with uncommitted changes" if dirty else "")


def host_line() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu}), "
        f"Python {platform.python_version()}"
    )


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


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


def add_area_options(p: argparse.ArgumentParser) -> None:
    """The options every benchmark here has: where it runs, which repld, the seed."""
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the image file goes (default /var/tmp)")  # fmt: skip
    p.add_argument("--image-size", type=parse_size, default=8 * GIB,
                   help="size of the ext4 image (default 8G)")  # fmt: skip
    p.add_argument("--sparse-image", action="store_true",
                   help="leave the image sparse instead of writing it through with zeros first "
                   "(quicker to set up, but the first tool to write into never-used space pays "
                   "the host's allocation)")  # fmt: skip
    p.add_argument("--no-loop", type=Path, metavar="DIR",
                   help="run in a temporary directory under DIR, no loop device")  # fmt: skip
    p.add_argument("--repld", type=Path, help="the repld executable (default: next to "
                   "this Python, else on PATH)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="random seed for the trees (default 1)")


def report_paths(kind: str) -> tuple[Path, Path]:
    """``bench/out/KIND-<timestamp>.md`` and the ``.log`` beside it."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    md_path = OUT_DIR / f"{kind}-{stamp}.md"
    return md_path, md_path.with_suffix(".log")


class Benchmark(Protocol):
    problems: list[str]

    def run_all(self) -> None: ...

    def render(self) -> str: ...


def drive(
    kind: str,
    args: argparse.Namespace,
    make: Callable[[Path, str, Runner], Benchmark],
    cleanup: Callable[[], None] = lambda: None,
) -> int:
    """Run a benchmark in its work area with its log, write and print its report; exit status.

    ``make(area, description of the file system, runner)`` builds it; ``cleanup`` (stopping
    what it started) runs before the report is rendered and again on the way out.
    """
    # Ctrl-C and kill both unwind through the finally blocks: the image is unmounted and deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    md_path, log_path = report_paths(kind)
    report = ""
    status = 0
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="repld-bench-") as scratch:
        runner = Runner(log, Path(scratch))
        try:
            area_cm, fs = work_area(args.no_loop, args.workdir, args.image_size, runner,
                                    sparse=args.sparse_image)  # fmt: skip
            with area_cm as area:
                bench = make(area, fs, runner)
                try:
                    bench.run_all()
                except BenchError as e:
                    bench.problems.append(f"benchmark stopped: {e}")
                    raise
                finally:
                    cleanup()
                    report = bench.render()
                    md_path.write_text(report)
        except BenchError as e:
            runner.note(f"error: {e}")
            status = 1
        finally:
            cleanup()
    if report:
        print(report)
        print(f"written to {md_path}", file=sys.stderr)
    print(f"commands and their output: {log_path}", file=sys.stderr)
    return status


def problems_section(problems: list[str]) -> str:
    if not problems:
        return ""
    return "\nProblems:\n\n" + "".join(
        f"- {p.replace(chr(10), chr(10) + '  ')}\n" for p in problems
    )
